"""The demo model's vocabulary warning: unknown prompt words are named in one line, through the
CLI (stderr) and the API; known words, the edit grammar and real checkpoints never warn."""

import pytest

from nextstep_core import DEMO_MODEL
from nextstep_core.cli import main
from nextstep_core.demo.scenes import caption, random_edit, random_scene
from nextstep_core.demo.vocabulary import EXAMPLE, demo_model_warning, unknown_words, vocabulary_warning


def test_unknown_words_ignore_case_punctuation_and_the_marker():
    assert unknown_words("A Purple CAT, on the left!") == ["purple", "cat"]
    assert unknown_words("<image> make the red circle green") == []
    assert unknown_words("a cat and a cat") == ["cat"]
    assert unknown_words("") == []


def test_every_caption_and_edit_of_the_scene_generator_is_known():
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = random_scene(rng)
        assert unknown_words(caption(scene)) == [], caption(scene)
        _, instruction, _ = random_edit(rng, scene)
        assert unknown_words(instruction) == [], instruction
    assert unknown_words(EXAMPLE) == []


def test_every_free_phrasing_it_was_trained_on_is_known():
    import numpy as np

    from nextstep_core.demo.phrasing import free_caption, free_instruction

    rng = np.random.default_rng(1)
    for _ in range(200):
        scene = random_scene(rng)
        text = free_caption(caption(scene), rng)
        assert unknown_words(text) == [], text
        instruction = free_instruction(random_edit(rng, scene)[1], rng)
        assert unknown_words(instruction) == [], instruction
    assert unknown_words("a big circle in the middle, a tiny square in the upper left corner") == []


def test_the_warning_names_the_words_and_the_vocabulary():
    assert vocabulary_warning(EXAMPLE) is None
    warning = vocabulary_warning("a purple cat")
    assert warning.startswith("the demo model does not know the word(s) purple, cat and ignores them.")
    assert "circles, squares, triangles" in warning and "red" in warning and "top left" in warning
    assert "\n" not in warning
    assert demo_model_warning(DEMO_MODEL, "a purple cat") == warning
    assert demo_model_warning("/some/other/model", "a purple cat") is None
    assert demo_model_warning(None, "a purple cat") is None


@pytest.mark.parametrize("prompt, warns", [("a purple cat", True), (EXAMPLE, False)])
def test_the_cli_warns_on_stderr_for_the_demo_model(prompt, warns, tmp_path, capsys):
    code = main(["generate", "--prompt", prompt, "--steps", "2", "--quiet", "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 0
    assert ("warning: the demo model does not know the word(s) purple, cat" in err) is warns


def test_real_checkpoints_never_warn(tiny_model_1_1, tmp_path, capsys):
    code = main(["generate", "--model", str(tiny_model_1_1), "--prompt", "a purple cat", "--steps", "2",
                 "--width", "32", "--height", "32", "--out", str(tmp_path / "o.png")])
    assert code == 0 and "does not know" not in capsys.readouterr().err


def test_the_word_list_is_what_the_scene_grammar_and_the_phrasings_define():
    from nextstep_core.demo.vocabulary import derived_vocabulary, vocabulary

    assert vocabulary() == derived_vocabulary(), "vocabulary.json is stale: python -m nextstep_core.demo.vocabulary"


def test_warning_needs_no_scene_or_training_module():
    import subprocess
    import sys

    code = ("import sys; from nextstep_core.demo.vocabulary import vocabulary_warning; "
            "vocabulary_warning('a purple cat'); print(sorted(m for m in sys.modules if '.demo' in m))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['nextstep_core.demo', 'nextstep_core.demo.vocabulary']"
