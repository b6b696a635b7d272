"""Build hook: the shipped checkpoints travel in the wheel as package data, `lm/checkpoints/`.

Everything else about the package is declared in pyproject.toml. The top-level checkpoints/
folder stays where it is (recipes, cards and train_all.sh live beside the weights); a
wheel gets a copy of each checkpoint's serving files only, never train_state.pt. Editable
installs and source checkouts read checkpoints/ in place (lm.checkpoint.shipped_dir).
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
# config, weights, tokenizer (SentencePiece keeps its .model beside it), card, recipe
SERVING_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer.model",
    "README.md",
    "EXTRA.md",
    "recipe.toml",
)


class BuildWithCheckpoints(build_py):
    """build_py that also copies checkpoints/<name>/{SERVING_FILES} to lm/checkpoints/<name>/."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "lm" / "checkpoints"
        for directory in sorted(CHECKPOINTS.iterdir()):
            if not (directory / "config.json").is_file():
                continue
            self.mkpath(str(target / directory.name))
            for name in SERVING_FILES:
                if (directory / name).is_file():
                    self.copy_file(str(directory / name), str(target / directory.name / name))


setup(cmdclass={"build_py": BuildWithCheckpoints})
