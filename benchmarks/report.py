"""Make the tables of docs/benchmarks.md from the result files in benchmarks/results/.

The prose of docs/benchmarks.md is written by hand; every table of figures sits between
marker comments and is generated here from the recorded runs (``common.write_result``)::

    <!-- table:train_cpu -->
    ... generated, never edited by hand ...
    <!-- /table -->

Each table names its source files, commands, dates and machines. A table shows the newest
record per configuration (e.g. per dtype and XLA flags for ``train_cpu``), so re-recording is
one benchmark command followed by ``python -m benchmarks.report``; older files stay as history
and can be deleted. Smoke runs (``"quick"`` in their setup) never reach a table.

    python -m benchmarks.report            # rewrite the tables in docs/benchmarks.md
    python -m benchmarks.report --check    # exit 1 (with a diff) if they are out of date

Reads JSON only: no jax, so ``--check`` is fast.
"""

import argparse
import difflib
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

if not __package__:  # run as a file, not with -m: make the `benchmarks` package importable
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO_ROOT, RESULTS_DIR, load_results

DOC = REPO_ROOT / "docs" / "benchmarks.md"
MARKER = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)
Record = dict[str, Any]


# --------------------------------------------------------------------------------- formatting
def _number(value: float | None, digits: int = 1) -> str:
    """``1234.56 -> "1,234.6"``; None -> "-"."""
    return "-" if value is None else f"{value:,.{digits}f}"


def _percent(value: float | None) -> str:
    """``0.1234 -> "12.3%"``; None -> "-"."""
    return "-" if value is None else f"{100 * value:.1f}%"


def _table(header: list[str], rows: Iterable[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _file_name(record: Record) -> str:
    """The record's file, named from the repository root (plain text: the docs site holds
    only docs/, so a relative link out of it would not resolve there)."""
    return f"`benchmarks/results/{record['file']}`"


def _code(record: Record) -> str:
    """The measured code: its commit and whether the packages under test had local edits."""
    code = record.get("code") or {}
    if not code.get("commit"):
        return "code not in a git checkout"
    packages = ("jaxstack/", "pallas_kernels/", "sharding_rules/")
    edited = [path for path in code.get("uncommitted", []) if path.startswith(packages)]
    state = f"{len(edited)} uncommitted files in them" if edited else "as committed"
    return f"jaxstack, pallas_kernels, sharding_rules at {code['commit'][:10]} {state}"


def _source(records: list[Record]) -> str:
    """One bullet per record: file, command, date, machine, load, measured code, versions."""
    lines = []
    for record in records:
        machine, versions = record["machine"], record["versions"]
        loads = [f"{load[0]:.2f} at the {when}" for when, load in (
            ("start", machine.get("load_average_at_start_1_5_15")),
            ("end", machine.get("load_average_1_5_15")),
        ) if load is not None]  # fmt: skip
        load_text = f", load average {', '.join(loads)}" if loads else ""
        software = ", ".join(f"{name} {version}" for name, version in versions.items())
        lines.append(
            f"- {_file_name(record)}: `{record['command']}`, {record['date']}; "
            f"{machine['cpu']} ({machine['usable_cores']} cores, "
            f"{', '.join(machine.get('cpu_flags', [])) or 'no ISA flags read'}"
            f"{load_text}); {_code(record)}; {software}"
        )
    return "\n".join(lines)


def _newest_per(records: list[Record], key: Callable[[Record], Any]) -> list[Record]:
    """The newest record for each value of ``key`` (records come oldest first)."""
    newest = {}
    for record in records:
        newest[key(record)] = record
    return list(newest.values())


def _of(records: list[Record], benchmark: str) -> list[Record]:
    """The records of ``benchmark`` that are measurements (no ``quick`` smoke runs)."""
    return [
        r
        for r in records
        if r["benchmark"] == benchmark and not r["result"].get("setup", {}).get("quick")
    ]


# ----------------------------------------------------------------------------------- tables
def train_cpu_table(records: list[Record]) -> str:
    """One row per route (preset, dtype, extra XLA flags, batch x seq, frameworks): tokens/s
    and MFU of jaxstack, plain JAX and PyTorch, the two ratios and the matmul peak."""
    runs = _newest_per(
        _of(records, "train_cpu"),
        lambda r: (
            r["result"]["setup"]["preset"],
            r["result"]["setup"]["dtype"],
            r["result"]["setup"]["extra_xla_flags"],
            r["result"]["setup"]["batch"],
            r["result"]["setup"]["seq"],
            r["result"]["setup"]["model"]["scan_layers"],
            r["result"]["setup"].get("plain_dots", "xla"),
            tuple(r["result"]["setup"]["frameworks"]),
        ),
    )
    if not runs:
        return "_No recorded run yet: `python benchmarks/train_cpu.py` records one._"
    runs.sort(
        key=lambda r: (
            r["result"]["setup"]["preset"],
            r["result"]["setup"]["dtype"] != "float32",
            r["result"]["setup"].get("plain_dots", "xla") != "xla",
            r["result"]["setup"]["extra_xla_flags"],
        )
    )
    header = ["route: preset, dtype, extra XLA flags", "batch x seq"]
    header += [f"{label} tok/s (MFU); best step" for label in ("jaxstack", "plain JAX", "PyTorch")]
    header += [f"jaxstack / {label}: all steps; best step" for label in ("plain JAX", "PyTorch")]
    header += ["matmul peak GFLOP/s", "plain JAX dots by operand dtypes", "load 1/5/15 min", "file"]
    rows = []
    for record in runs:
        result, setup = record["result"], record["result"]["setup"]
        frameworks = result["frameworks"]
        flags = f"`{setup['extra_xla_flags']}`" if setup["extra_xla_flags"] else "stock flags"
        route = f"{setup['preset']}, {setup['dtype']}, {flags}"
        if setup.get("plain_dots", "xla") != "xla":
            route += f"; plain JAX dots: {setup['plain_dots']}"
        cells = [route, f"{setup['batch']} x {setup['seq']}"]
        for name in ("jaxstack", "plain_jax", "torch"):
            run = frameworks.get(name)
            cells.append(
                "-"
                if run is None
                else f"{_number(run['tokens_per_sec'])} ({_percent(run['mfu'])}); "
                f"{_number(run['best_step_tokens_per_sec'])}"
            )
        for other in ("plain_jax", "torch"):
            ratio = result["ratios"].get(f"jaxstack_over_{other}")
            if ratio is None:
                cells.append("-")
                continue
            best = (
                frameworks["jaxstack"]["best_step_tokens_per_sec"]
                / frameworks[other]["best_step_tokens_per_sec"]
            )
            cells.append(f"**{ratio:.2f}x**; {best:.2f}x")
        cells.append(_number(result["matmul_peak_flops"] / 1e9))
        plain = frameworks.get("plain_jax", {}).get("compiled", {}).get("dots", {})
        cells.append(", ".join(f"{n} {pair}" for pair, n in sorted(plain.items())) or "-")
        load = record["machine"].get("load_average_1_5_15")
        cells.append("-" if load is None else " / ".join(f"{x:.1f}" for x in load))
        cells.append(record["file"])
        rows.append(cells)
    return f"{_table(header, rows)}\n\nSources:\n\n{_source(runs)}"


def sharding_cpu_table(records: list[Record]) -> str:
    """The newest full run of ``sharding_cpu.py``: per mesh both tokens/s, their ratio and
    the parameter bytes per device."""
    runs = _of(records, "sharding_cpu")
    if not runs:
        return "_No recorded run yet: `python benchmarks/sharding_cpu.py` records one._"
    record = runs[-1]
    header = ["mesh (data, fsdp, tensor)", "Redco mesh (dp, mp)", "jaxstack tok/s"]
    header += ["Redco tok/s", "jaxstack / Redco", "param MB per device, jaxstack / Redco"]
    header.append("held-out loss before -> after, jaxstack / Redco")
    rows = []
    for row in record["result"]["rows"]:
        mesh, redco_mesh = row["mesh"], row.get("redco_mesh")
        redco = row.get("redco") or {}
        param_mb = [
            _number(part.get("param_bytes_per_device", 0) / 1e6, 2) if part else "-"
            for part in (row["jaxstack"], redco)
        ]
        ratio = row["ratio_jaxstack_over_redco"]
        losses = [
            f"{part['check_loss_before']:.4f} -> {part['check_loss_after']:.4f}"
            if "check_loss_after" in part
            else "-"
            for part in (row["jaxstack"], redco)
        ]
        rows.append(
            [
                f"({mesh['data']}, {mesh['fsdp']}, {mesh['tensor']})",
                "-" if redco_mesh is None else f"({redco_mesh['dp']}, {redco_mesh['mp']})",
                _number(row["jaxstack_tokens_per_sec"]),
                _number(row["redco_tokens_per_sec"]),
                "-" if ratio is None else f"{ratio:.2f}",
                " / ".join(param_mb),
                " / ".join(losses),
            ]
        )
    return f"{_table(header, rows)}\n\nSource:\n\n{_source([record])}"


def hf_load_table(records: list[Record]) -> str:
    """The newest run of ``hf_load.py``: per scenario load time, bytes and overhead."""
    runs = _of(records, "hf_load")
    if not runs:
        return "_No recorded run yet: `python benchmarks/hf_load.py` records one._"
    record = runs[-1]
    header = ["scenario", "load time", "placed params", "largest tensor (placed dtype)"]
    header += ["overhead", "overhead / largest tensor"]
    rows = [
        [
            scenario["scenario"],
            f"{scenario['load_seconds']:.2f} s",
            f"{scenario['placed_param_bytes'] / 1e6:,.0f} MB",
            f"{scenario['largest_tensor_bytes'] / 1e6:,.0f} MB",
            f"{scenario['overhead_bytes'] / 1e6:,.0f} MB",
            f"{scenario['overhead_over_largest_tensor']:.2f}",
        ]
        for scenario in record["result"]["scenarios"]
    ]
    return f"{_table(header, rows)}\n\nSource:\n\n{_source([record])}"


def attention_table(records: list[Record]) -> str:
    """The newest run of ``attention.py`` per accelerator (CPU runs only smoke-test the
    script: Pallas interprets there): TFLOP/s per sequence, mask and implementation."""
    runs = [r for r in _of(records, "attention") if r["result"]["backend"] != "cpu"]
    runs = _newest_per(runs, lambda r: r["result"]["device_kind"])
    if not runs:
        return (
            "_No recorded run on a GPU or TPU yet: `python -m benchmarks.attention` on one "
            "records it._"
        )
    header = ["device", "seq", "causal", "implementation", "fwd TFLOP/s", "fwd+bwd TFLOP/s"]
    header.append("notes")
    rows = [
        [
            record["result"]["device_kind"],
            str(row["seq"]),
            str(row["causal"]),
            row["implementation"],
            _number(row["forward_tflops"], 3),
            _number(row["forward_backward_tflops"], 3),
            row["note"],
        ]
        for record in runs
        for row in record["result"]["rows"]
    ]
    return f"{_table(header, rows)}\n\nSources:\n\n{_source(runs)}"


def checkpoint_table(records: list[Record]) -> str:
    """One row per setup (preset, batch x seq, keep, stored codecs, whether the step after a
    save updates the state in place): median iteration with a save every step and without,
    the overhead, the blocked and background parts of a save, the CPU time of a write
    uncompressed and with zstd, bytes and the restore."""
    runs = _newest_per(
        _of(records, "checkpoint"),
        lambda r: (
            r["result"]["setup"]["preset"],
            r["result"]["setup"]["batch"],
            r["result"]["setup"]["seq"],
            r["result"]["setup"]["keep_checkpoints"],
            tuple(r["result"]["checkpoint"]["codecs"]),
            _donates_after_save(r),
        ),
    )
    if not runs:
        return "_No recorded run yet: `python benchmarks/checkpoint.py` records one._"
    header = ["preset, batch x seq", "stored codec", "step after a save in place"]
    header.append("state / on disk MB")
    header += ["median step s: no save; save every step", "overhead: medians; paired; means"]
    header += ["blocked in save call s (median)", "one save alone: blocked; to end of write s"]
    header += ["one save alone: CPU s", "Orbax alone, write CPU s: uncompressed; zstd"]
    header += ["restore s (GB/s)", "load 1/5/15 min", "file"]
    rows = []
    for record in runs:
        result, setup = record["result"], record["result"]["setup"]
        trainers, ckpt = result["trainers"], result["checkpoint"]
        alone, codecs = result["median_isolated_save"], result["orbax_codecs"]
        overhead = result["overhead"]
        mark = "**" if overhead < result["goal_overhead"] else ""
        restore = result["restore"]
        load = record["machine"].get("load_average_1_5_15")
        rows.append(
            [
                f"{setup['preset']}, {setup['batch']} x {setup['seq']}",
                ", ".join(ckpt["codecs"]),
                "yes" if _donates_after_save(record) else "no",
                f"{ckpt['state_bytes'] / 1e6:,.0f} / {ckpt['bytes_on_disk'] / 1e6:,.0f}",
                f"{trainers['no_save']['median_step_s']:.2f}; "
                f"{trainers['save_every_step']['median_step_s']:.2f}",
                f"{mark}{_percent(overhead)}{mark}; {_percent(result['overhead_paired'])}; "
                f"{_percent(result['overhead_mean'])}",
                f"{result['median_save_blocked_s']:.3f}",
                f"{alone['blocked_s']:.3f}; {alone['total_s']:.2f}",
                f"{alone['cpu_s']:.2f}",
                f"{codecs['none']['save_cpu_s']:.2f}; {codecs['zstd']['save_cpu_s']:.2f}",
                f"{restore['restore_s']:.2f} ({restore['restore_bytes_per_sec'] / 1e9:.2f})"
                + ("" if restore["bit_identical"] else ", NOT bit-identical"),
                "-" if load is None else " / ".join(f"{x:.1f}" for x in load),
                record["file"],
            ]
        )
    return f"{_table(header, rows)}\n\nSources:\n\n{_source(runs)}"


def _donates_after_save(record: Record) -> bool:
    """Whether the saving trainer's steps reused (donated) the state's buffers in most timed
    iterations of a ``checkpoint`` record."""
    return record["result"]["trainers"]["save_every_step"]["donated_fraction"] > 0.5


def moe_table(records: list[Record]) -> str:
    """The newest ``moe.py`` run per device: the expert computation's forward + backward by
    route (tokens/s, active TFLOP/s, speed relative to the layer's gmm path, largest
    difference from it), then training tokens/s of the MoE preset against its dense twin."""
    runs = _newest_per(_of(records, "moe"), lambda r: r["result"]["device_kind"])
    if not runs:
        return "_No recorded run yet: `python -m benchmarks.moe` records one._"
    header = ["device", "tokens x d x f, E, k, dtype", "route", "tokens/s", "active TFLOP/s"]
    header += ["vs gmm (ours)", "max abs diff"]
    rows = []
    for record in runs:
        layer = record["result"]["layer"]
        shape = (
            f"{layer['tokens']} x {layer['hidden']} x {layer['expert_width']}, "
            f"{layer['experts']}, {layer['top_k']}, {layer['dtype']}"
        )
        rows += [
            [
                record["result"]["device_kind"],
                shape,
                row["route"],
                _number(row["tokens_per_s"], 0),
                _number(row["active_tflops"], 4),
                f"{row['speedup_vs_gmm']:.2f}x",
                f"{row['max_abs_diff_vs_first']:.1e}",
            ]
            for row in layer["rows"]
        ]
    train_header = ["device", "preset, batch x seq, dtype", "model", "params (active)"]
    train_header += ["tokens/s", "MoE / dense tokens/s", "load 1/5/15 min"]
    train_rows = []
    for record in runs:
        training, load = record["result"]["training"], record["machine"].get("load_average_1_5_15")
        for name in ("moe", "dense"):
            model = training[name]
            train_rows.append(
                [
                    record["result"]["device_kind"],
                    f"{training['preset']}, {training['batch']} x {training['seq']}, "
                    f"{training['dtype']}",
                    name,
                    f"{model['params']:,} ({model['active_params']:,})",
                    _number(model["tokens_per_s"], 0),
                    f"{training['moe_over_dense_tokens_per_s']:.2f}",
                    "-" if load is None else " / ".join(f"{x:.1f}" for x in load),
                ]
            )
    return (
        f"{_table(header, rows)}\n\n{_table(train_header, train_rows)}\n\n"
        f"Sources:\n\n{_source(runs)}"
    )


def _ms_pair(ours: float, theirs: float) -> str:
    """Two latencies in seconds as ``"121 / 32 ms"``."""
    return f"{ours * 1e3:,.0f} / {theirs * 1e3:,.0f} ms"


def serve_vllm_table(records: list[Record]) -> str:
    """The newest ``serve.py`` run per model and dtype against vLLM: per concurrency, both
    engines' output tokens/s and their ratio, TTFT and TPOT p50/p99 (jaxstack / vLLM), the
    requests with the same greedy tokens; then the time to ready and, where recorded,
    jaxstack's step profile."""
    runs = [
        (record, run)
        for record in _of(records, "serve")
        if record["result"]["setup"].get("peer") == "vllm"
        for run in record["result"]["runs"]
    ]
    newest = {(run["model"], run["params"], run["dtype"]): (record, run) for record, run in runs}
    if not newest:
        return "_No recorded run yet: `python benchmarks/serve.py` records one._"
    header = ["model, dtype", "concurrency", "jaxstack tok/s", "vLLM tok/s", "jaxstack / vLLM"]
    header += ["TTFT p50 (jaxstack / vLLM)", "TTFT p99", "TPOT p50", "TPOT p99", "same tokens"]
    rows, ready_rows, profile_rows = [], [], []
    order = sorted(newest, key=lambda key: (key[1], key[2] != "float32", key))
    for _, run in (newest[key] for key in order):
        model = f"{run['params'] / 1e6:.1f}M, {run['dtype']}"
        by = {(row["engine"], row["concurrency"]): row for row in run["rows"]}
        same = {check["concurrency"]: check for check in run["tokens"]}
        for level in sorted({row["concurrency"] for row in run["rows"]}):
            ours, theirs = by["jaxstack", level], by["vllm", level]
            pairs = [_ms_pair(ours[k], theirs[k]) for k in
                     ("ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s")]  # fmt: skip
            ratio = ours["output_tokens_per_s"] / theirs["output_tokens_per_s"]
            rows.append([model, str(level), _number(ours["output_tokens_per_s"]),
                         _number(theirs["output_tokens_per_s"]), f"**{ratio:.2f}x**", *pairs,
                         f"{same[level]['same']}/{same[level]['requests']}"])  # fmt: skip
            profile = ours.get("profile")
            if profile:
                phases = ", ".join(f"{name} {ms:.1f}" for name, ms in
                                   profile["phase_ms_per_token"].items())  # fmt: skip
                profile_rows.append([model, str(level), phases,
                                     _number(profile["engine_ms_per_token"]),
                                     _number(profile["http_ms_per_token"]),
                                     _number(profile["client_ms_per_token"])])  # fmt: skip
        ready = run["ready_s"]
        ready_rows.append([model, _number(ready["jaxstack"]), _number(ready["vllm"])])
    sources = list({record["file"]: record for record, _ in newest.values()}.values())
    setups = {(s["max_tokens"], s["prompt_tokens"], s["requests_per_slot"], s["idle_server"])
              for s in (r["result"]["setup"] for r in sources)}  # fmt: skip
    note = "; ".join(
        f"{tokens} output tokens per request, prompts {prompt} tokens, requests per slot: "
        f"{per_slot}, the engine not measured: {idle}"
        for tokens, prompt, per_slot, idle in sorted(setups)
    )
    parts = [f"{note}.", _table(header, rows),
             _table(["model, dtype", "jaxstack ready s", "vLLM ready s"], ready_rows)]  # fmt: skip
    if profile_rows:
        profile_header = ["model, dtype", "concurrency", "jaxstack ms per output token by phase"]
        profile_header += ["engine ms/token", "HTTP ms/token", "client ms/token"]
        parts.append(_table(profile_header, profile_rows))
    return "\n\n".join([*parts, f"Sources:\n\n{_source(sources)}"])


def serve_table(records: list[Record]) -> str:
    """The newest run of ``serve.py --peer transformers`` per way transformers served: per
    concurrency, jaxstack's engine and transformers side by side (output tokens/s, TTFT and
    TPOT p50/p99) and the throughput ratio."""
    runs = _newest_per(
        [r for r in _of(records, "serve") if r["result"]["setup"].get("peer") != "vllm"],
        lambda r: r["result"]["setup"]["transformers_method"],
    )
    if not runs:
        return (
            "_No recorded run yet: `python benchmarks/serve.py --peer transformers` records one._"
        )
    header = ["transformers serving", "concurrency", "framework", "output tok/s", "TTFT p50"]
    header += ["TTFT p99", "TPOT p50", "TPOT p99", "tok/s vs transformers"]
    ms = lambda seconds: f"{seconds * 1e3:,.1f} ms"  # noqa: E731
    rows = []
    for record in runs:
        method = record["result"]["setup"]["transformers_method"]
        levels: dict[int, dict[str, Record]] = {}
        for row in record["result"]["rows"]:
            levels.setdefault(row["concurrency"], {})[row["framework"]] = row
        for level, frameworks in sorted(levels.items()):
            base = frameworks["transformers"]["output_tokens_per_s"]
            for name in ("jaxstack", "transformers"):
                row = frameworks[name]
                rows.append([
                    method, str(level), name, _number(row["output_tokens_per_s"]),
                    ms(row["ttft_p50_s"]), ms(row["ttft_p99_s"]),
                    ms(row["tpot_p50_s"]), ms(row["tpot_p99_s"]),
                    f"{row['output_tokens_per_s'] / base:.2f}x",
                ])  # fmt: skip
    setups = {
        (s["params"], s["max_tokens"], s["prompt_tokens"])
        for s in (r["result"]["setup"] for r in runs)
    }
    note = "; ".join(
        f"{params:,}-parameter Llama, {tokens} output tokens per request, prompts {prompt} tokens"
        for params, tokens, prompt in sorted(setups)
    )
    return f"{note}.\n\n{_table(header, rows)}\n\nSources:\n\n{_source(runs)}"


def collectives_table(records: list[Record]) -> str:
    """The newest ``collectives.py`` run per device: training step time of each variant of a
    group (tensor-parallel modes, context-parallel attention strategies) beside the group's
    first variant, with the first step's loss (equal within a group up to rounding)."""
    runs = _newest_per(_of(records, "collectives"), lambda r: r["result"]["device_kind"])
    if not runs:
        return "_No recorded run yet: `python -m benchmarks.collectives` records one._"
    header = ["device", "width, layers, batch x seq", "group", "variant", "step ms"]
    header += ["vs first", "first loss", "load 1/5/15 min"]
    rows = []
    for record in runs:
        setup, load = record["result"]["setup"], record["machine"].get("load_average_1_5_15")
        shape = f"{setup['hidden']}, {setup['layers']}, {setup['batch']} x {setup['seq']}"
        for group, result in record["result"]["groups"].items():
            rows += [
                [
                    record["result"]["device_kind"], shape, group, row["variant"],
                    _number(row["median_step_s"] * 1e3), f"{row['step_time_vs_baseline']:.2f}x",
                    f"{row['first_loss']:.5f}",
                    "-" if load is None else " / ".join(f"{x:.1f}" for x in load),
                ]
                for row in result["rows"]
            ]  # fmt: skip
    return f"{_table(header, rows)}\n\nSources:\n\n{_source(runs)}"


def pipeline_table(records: list[Record]) -> str:
    """The newest ``pipeline.py`` run per device: step time, tokens/s and the bubble (formula
    and measured) of the pipeline variants beside the data and fsdp meshes, then each offload
    choice's device bytes (arguments off the host, and temporaries) and step time."""
    runs = _newest_per(_of(records, "pipeline"), lambda r: r["result"]["device_kind"])
    if not runs:
        return "_No recorded run yet: `python -m benchmarks.pipeline` records one._"
    tables = []
    for record in runs:
        result = record["result"]
        setup = result["setup"]
        shape = (f"{result['device_kind']}; width {setup['hidden']}, {setup['layers']} layers, "
                 f"batch {setup['batch']} x {setup['seq']}")  # fmt: skip
        rows = [
            [
                row["variant"], _number(row["median_step_s"] * 1e3), _number(row["tokens_per_s"]),
                _percent(row.get("bubble_formula")), _percent(row.get("bubble_measured")),
                f"{row['first_loss']:.5f}",
            ]
            for row in result["pipeline"]
        ]  # fmt: skip
        header = ["mesh", "step ms", "tokens/s", "bubble (formula)", "bubble (measured)"]
        tables.append(f"{shape}\n\n{_table([*header, 'first loss'], rows)}")
        rows = [
            [
                row["variant"], _number(row["device_argument_bytes"] / 2**20, 2),
                _number(row["host_argument_bytes"] / 2**20, 2),
                _number(row["temp_bytes"] / 2**20, 2), _number(row["median_step_s"] * 1e3),
                f"{row['first_loss']:.5f}",
            ]
            for row in result["offload"]
        ]  # fmt: skip
        header = ["offload (data=8)", "device args MiB", "host args MiB", "temp MiB", "step ms"]
        tables.append(_table([*header, "first loss"], rows))
    return "\n\n".join(tables) + f"\n\nSources:\n\n{_source(runs)}"


TABLES: dict[str, Callable[[list[Record]], str]] = {
    "train_cpu": train_cpu_table,
    "sharding_cpu": sharding_cpu_table,
    "hf_load": hf_load_table,
    "attention": attention_table,
    "checkpoint": checkpoint_table,
    "moe": moe_table,
    "serve_vllm": serve_vllm_table,
    "serve": serve_table,
    "collectives": collectives_table,
    "pipeline": pipeline_table,
}
"""Marker name in docs/benchmarks.md -> the function making that table from all records."""


# ------------------------------------------------------------------------------- documents
def render(text: str, records: list[Record]) -> str:
    """``text`` with the body of every ``<!-- table:NAME -->`` block regenerated.

    Raises:
        ValueError: a marker names a table ``TABLES`` does not have.
    """

    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in TABLES:
            raise ValueError(f"<!-- table:{name} -->: no such table; known: {sorted(TABLES)}")
        return f"{match[1]}{TABLES[name](records)}\n{match[4]}"

    return MARKER.sub(replace, text)


def main(argv: list[str] | None = None) -> int:
    """Rewrite (or with ``--check`` verify) the tables; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the doc is stale")
    parser.add_argument("--doc", type=Path, default=DOC, help=f"default: {DOC}")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    text = args.doc.read_text()
    updated = render(text, load_results(args.results_dir))
    if text == updated:
        return 0
    if args.check:
        diff = difflib.unified_diff(
            text.splitlines(keepends=True),
            updated.splitlines(keepends=True),
            str(args.doc),
            f"{args.doc} (from {args.results_dir})",
        )
        sys.stdout.writelines(diff)
        print(f"\n{args.doc} is out of date: run `python -m benchmarks.report`", file=sys.stderr)
        return 1
    args.doc.write_text(updated)
    print(f"updated {args.doc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
