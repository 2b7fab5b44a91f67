"""The non-LM recipe trains through the same three-function API."""

import importlib.util
from pathlib import Path

RECIPE = Path(__file__).parents[2] / "recipes" / "classifier.py"


def test_classifier_recipe_learns(tmp_path):
    spec = importlib.util.spec_from_file_location("classifier", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    metrics = recipe.main(["--steps", "60", "--work-dir", str(tmp_path)])
    assert metrics["eval_accuracy"] > 0.9
    assert (tmp_path / "metrics.jsonl").exists()
