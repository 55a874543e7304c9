"""The example input pictures the pack's workflows load, put into ComfyUI's input folder.

ComfyUI's template browser serves a pack's workflows, but Load Image only lists files in the
input folder. So at start-up every picture in workflows/input/ that the input folder lacks is
copied there (an existing file of the same name is never overwritten). One of them carries an
alpha-painted area, the way ComfyUI's mask editor saves a mask: Load Image's MASK output.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "workflows" / "input"


def install_example_inputs(input_dir: str | Path | None = None) -> list[Path]:
    """Copy the missing example pictures into `input_dir` (ComfyUI's input folder); returns the copies."""
    if input_dir is None:
        import folder_paths  # ComfyUI's module, present only inside ComfyUI

        input_dir = folder_paths.get_input_directory()
    target = Path(input_dir)
    copied = []
    for source in sorted(EXAMPLES.glob("*.png")):
        destination = target / source.name
        if destination.exists():
            continue
        try:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, destination)
            copied.append(destination)
        except OSError as exc:  # a read-only input folder: the workflows then need the user's own picture
            logging.warning("NextStep: could not copy the example input %s to %s: %s", source.name, target, exc)
    if copied:
        logging.info("NextStep: copied the example input(s) %s to %s", ", ".join(p.name for p in copied), target)
    return copied
