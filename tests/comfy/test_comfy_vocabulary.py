"""The demo model's vocabulary warning in the real server: words it does not know are named on
the node (its progress text, a TEXT websocket message) and in the console; real checkpoints and
known words never warn."""

import struct

import pytest
from comfy_harness import needs_comfyui
from test_comfy_execution import collect, t2i_prompt

pytestmark = needs_comfyui

TEXT = 3  # ComfyUI's BinaryEventTypes.TEXT: (node id length, node id, text)


def node_texts(comfy, prompt) -> list[tuple[str, str]]:
    ws, client_id = comfy.websocket()
    try:
        status, answer = comfy.queue(prompt, client_id)
        assert status == 200, answer
        texts, binaries = collect(ws, answer["prompt_id"])
    finally:
        ws.close()
    assert texts[-1]["type"] == "execution_success"
    found = []
    for message in binaries:
        if struct.unpack(">I", message[:4])[0] != TEXT:
            continue
        length = struct.unpack(">I", message[4:8])[0]
        found.append((message[8:8 + length].decode(), message[8 + length:].decode()))
    return found


@pytest.mark.parametrize("model, prompt, warns", [
    ("nextstep-demo", "a purple cat on the left", True),
    ("nextstep-demo", "a large red circle on the left, on a white background", False),
    ("NextStep-1.1", "a purple cat on the left", False),
])
def test_unknown_words_of_the_demo_model_are_named_on_the_node(comfy, model, prompt, warns):
    request = t2i_prompt(width=64, height=64, prompt=prompt, seed=2)
    request["1"]["inputs"]["model_name"] = model
    warnings = [(node, text) for node, text in node_texts(comfy, request) if "does not know" in text]
    if warns:
        assert warnings and warnings[0][0] == "2"
        assert warnings[0][1].startswith("the demo model does not know the word(s) purple, cat and ignores them.")
        assert "NextStep: the demo model does not know the word(s) purple, cat" in comfy.log()
    else:
        assert warnings == []
