"""Every shipped recipe parses into a valid Config and names its run after its path."""

from pathlib import Path

import pytest

from vall_e.config import Config

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "config").rglob("*.yml"))


def test_recipes_exist():
    names = {p.relative_to(REPO / "config").as_posix() for p in RECIPES}
    assert {"LibriTTS/ar.yml", "LibriTTS/ar-quarter.yml", "LibriTTS/nar.yml", "LibriTTS/nar-quarter.yml",
            "test/ar.yml", "test/nar.yml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(REPO / "config").as_posix())
def test_recipe_parses(path):
    cfg = Config.build(path)
    assert cfg.cfg_name == path.relative_to(REPO / "config").with_suffix("").as_posix()
    assert cfg.model_kind in {"ar", "nar"} and path.stem.startswith(cfg.model_kind)
    assert cfg.data_dirs
    if path.parent.name == "LibriTTS":
        assert cfg.get_spkr(Path("data/LibriTTS/19/198/19_198_000000_000000.qnt.pt")) == "19"
    else:
        assert cfg.codec_weights == "untrained"  # data/test's codes come from the untrained codec
