"""UI-format workflows (what ComfyUI's frontend saves) -> API prompts, checked against /object_info.

The frontend does the same when it queues a graph: it walks every node's widgets in the order of
the node's inputs (input_order: required, then optional), where a widget with
control_after_generate carries one more value (fixed / increment / decrement / randomize) and
an upload combo (LoadImage) one more too, and it takes links from the node's input slots.
"""

from __future__ import annotations

VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}  # exist only in the frontend
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
MUTED, BYPASSED = 2, 4


def input_specs(info: dict) -> list[tuple[str, object, dict]]:
    """(name, type, options) of a node's inputs in the frontend's order."""
    declared = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    order = info.get("input_order", {})
    names = order.get("required", []) + order.get("optional", []) if order else list(declared)
    specs = []
    for name in names:
        entry = declared[name]
        specs.append((name, entry[0], entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}))
    return specs


def is_widget(kind, options: dict) -> bool:
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput")


def extra_values(options: dict) -> int:
    return int(bool(options.get("control_after_generate"))) + sum(bool(options.get(f)) for f in UPLOAD_FLAGS)


def widget_values(node: dict, info: dict) -> dict[str, tuple[object, object, dict]]:
    """name -> (value, type, options) for every widget of a UI node; raises on a count mismatch."""
    values = list(node.get("widgets_values") or [])
    out, i = {}, 0
    for name, kind, options in input_specs(info):
        if not is_widget(kind, options):
            continue
        if i >= len(values):
            raise ValueError(f"node {node['id']} ({node['type']}): no value for widget {name}")
        out[name] = (values[i], kind, options)
        if options.get("control_after_generate") and values[i + 1] not in CONTROL_VALUES:
            raise ValueError(f"node {node['id']} ({node['type']}): {values[i + 1]!r} after {name} is not a "
                             f"control_after_generate mode")
        i += 1 + extra_values(options)
    if i != len(values):
        raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values, the node has {i}")
    return out


def check_value(name: str, value, kind, options: dict) -> str | None:
    """Why a widget value is invalid for its input, or None."""
    choices = kind if isinstance(kind, list) else options.get("options") if kind == "COMBO" else None
    if choices is not None:
        return None if value in choices else f"{name}: {value!r} is not one of {choices[:12]}"
    if kind == "INT" and (not isinstance(value, int) or isinstance(value, bool)):
        return f"{name}: {value!r} is not an integer"
    if kind == "FLOAT" and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        return f"{name}: {value!r} is not a number"
    if kind in ("INT", "FLOAT"):
        if "min" in options and value < options["min"]:
            return f"{name}: {value} < min {options['min']}"
        if "max" in options and value > options["max"]:
            return f"{name}: {value} > max {options['max']}"
    if kind == "STRING" and not isinstance(value, str):
        return f"{name}: {value!r} is not a string"
    if kind == "BOOLEAN" and not isinstance(value, bool):
        return f"{name}: {value!r} is not a boolean"
    return None


def check_workflow(workflow: dict, object_info: dict) -> list[str]:
    """Every problem found: unknown node types, widget counts, invalid values, bad links."""
    problems = []
    links = {link[0]: link for link in workflow.get("links", [])}
    nodes = {node["id"]: node for node in workflow["nodes"]}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_NODES:
            continue
        info = object_info.get(node["type"])
        if info is None:
            problems.append(f"node {node['id']}: unknown node type {node['type']}")
            continue
        try:
            widgets = widget_values(node, info)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        for name, (value, kind, options) in widgets.items():
            why = check_value(name, value, kind, options)
            if why:
                problems.append(f"node {node['id']} ({node['type']}) {why}")
        specs = {name: (kind, options) for name, kind, options in input_specs(info)}
        for slot in node.get("inputs", []):
            if slot["name"] not in specs:
                problems.append(f"node {node['id']} ({node['type']}): no input named {slot['name']}")
            elif slot.get("link") is not None:
                link = links.get(slot["link"])
                source = nodes.get(link[1]) if link else None
                if source is None:
                    problems.append(f"node {node['id']}: input {slot['name']} has a dangling link")
                    continue
                outputs = object_info.get(source["type"], {}).get("output", [])
                kind = specs[slot["name"]][0]
                if link[2] >= len(outputs) or (isinstance(kind, str) and outputs[link[2]] != kind):
                    problems.append(f"node {node['id']}: input {slot['name']} ({kind}) is linked to output "
                                    f"{link[2]} of {source['type']} {outputs}")
        required = info["input"].get("required", {})
        linked = {slot["name"] for slot in node.get("inputs", []) if slot.get("link") is not None}
        for name, (kind, options) in specs.items():
            if name in required and not is_widget(kind, options) and name not in linked:
                problems.append(f"node {node['id']} ({node['type']}): required input {name} is not connected")
    return problems


def to_api_prompt(workflow: dict, object_info: dict) -> dict:
    """The API prompt the frontend would queue for this workflow."""
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_NODES or node.get("mode", 0) in (MUTED, BYPASSED):
            continue
        info = object_info[node["type"]]
        inputs = {name: value for name, (value, _, _) in widget_values(node, info).items()}
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                link = links[slot["link"]]
                inputs[slot["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
