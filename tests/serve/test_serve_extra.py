"""Serving is an extra: ``import jaxstack``, training and ``js.LLM`` need none of the web
packages, and ``jaxstack serve`` without them names the extra to install."""

import subprocess
import sys
import textwrap

from jaxstack import cli

WITHOUT_WEB_PACKAGES = textwrap.dedent(
    """
    import sys

    WEB = {"fastapi", "starlette", "uvicorn", "prometheus_client"}

    class Uninstalled:  # as if the serve extra were not installed
        tried = set()

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in WEB:
                self.tried.add(name.split(".")[0])
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, Uninstalled())
    import jaxstack as js, jaxstack.cli, jaxstack.trainer, jaxstack.run

    assert not Uninstalled.tried - {"prometheus_client"}, Uninstalled.tried  # grain tries it
    assert not [m for m in sys.modules if m.startswith("jaxstack.serve")], "engine imported"
    import jax, jax.numpy as jnp
    model = js.models.Llama(js.models.preset("tiny", num_layers=1, max_seq_len=32))
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    expected = js.generate(model, params, [[1, 2, 3]], max_new_tokens=3)[0]
    with js.LLM(model, params, num_pages=8, page_size=4, token_buckets=(8,),
                seq_buckets=(2,), progress=False) as llm:
        out = llm.generate([[1, 2, 3]], js.SamplingParams(max_tokens=3))[0]
        assert llm.engine.metrics.registry is None
    assert out.token_ids == expected, (out.token_ids, expected)
    assert not Uninstalled.tried - {"prometheus_client"}, Uninstalled.tried
    print("ok")
    """
)


def test_jaxstack_training_and_llm_run_without_the_web_packages():
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_WEB_PACKAGES], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_serve_without_the_extra_names_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi now raises ImportError
    monkeypatch.delitem(sys.modules, "jaxstack.serve.server", raising=False)
    assert cli.main(["serve", "--hf", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "needs the fastapi package" in error and 'pip install "jaxstack[serve]"' in error
