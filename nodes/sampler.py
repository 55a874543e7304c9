"""NextStep Sampler: the token sampler's settings set once and shared by several sampling nodes.

Like KSamplerSelect feeding SamplerCustomAdvanced: its NEXTSTEP_SAMPLER output goes into the
optional `sampler_settings` input of Text to Image, Edit Image, Continue Image and Regenerate
Region, and then replaces their own sampler widgets (steps, sampler, shift, noise level, cfg
schedule, token norm, velocity norm), so a chain of passes samples alike from one place. Left
unconnected, each node uses its own widgets, as saved workflows do.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..nextstep_core import CFG_SCHEDULES, SAMPLERS

USE_NORM = {"auto": None, "on": True, "off": False}
NextStepSamplerType = io.Custom("NEXTSTEP_SAMPLER")


def sampler_widgets() -> list:
    """The sampler's widgets, on NextStep Sampler and (last of their sampling widgets) on every sampling node."""
    return [
        io.Int.Input("steps", default=0, min=0, max=200,
                     tooltip="Flow steps per image token (each token is sampled by its own small flow). "
                             "0: the model's default (50 for NextStep-1.0, 28 for NextStep-1.1)."),
        io.Combo.Input("sampler", options=["auto", *SAMPLERS], default="auto",
                       tooltip="Token sampler. auto: the model's own (euler_maruyama for 1.0, sde for 1.1); "
                               "ode is deterministic."),
        io.Float.Input("shift", default=0.0, min=0.0, max=20.0, step=0.05, round=0.01,
                       tooltip="Time shift of each token's flow. 0: the model's default "
                               "(1.0; 3.2 when editing)."),
        io.Float.Input("noise_level", default=0.8, min=0.0, max=1.0, step=0.01,
                       tooltip="Noise injected per step by the sde and cps samplers."),
        io.Combo.Input("cfg_schedule", options=list(CFG_SCHEDULES), default="constant",
                       tooltip="constant: the same guidance for every token. linear: guidance changes "
                               "linearly over the image's tokens (the model's own direction)."),
        io.Combo.Input("use_norm", options=list(USE_NORM), default="auto",
                       tooltip="Layer-normalise every sampled token, which keeps high cfg stable. "
                               "auto: on for NextStep-1.0, off for NextStep-1.1."),
        io.Boolean.Input("velocity_norm", default=False,
                         tooltip="Clamp the guided velocity's norm to the conditional one's (a NextStep-1.1 option)."),
    ]


SAMPLER_NAMES = tuple(widget.id for widget in sampler_widgets())


def speed_widgets() -> list:
    """Several tokens per decoder pass and annealed head steps: on NextStep Sampler only, which feeds
    every sampling node (docs/parallel-decoding.md)."""
    return [
        io.Int.Input("parallel_window", default=0, min=0, max=256, optional=True,
                     tooltip="Several image tokens per model pass: a token row starts once the row above is this "
                             "many tokens ahead, so rows are drawn side by side (fewer passes, faster; small windows "
                             "cost quality at row starts). 0: one token per pass, as the model was trained."),
        io.Int.Input("head_steps_floor", default=0, min=0, max=200, optional=True,
                     tooltip="Annealed flow steps: later tokens take fewer steps, linearly down to this many for "
                             "the last token. 0: every token takes all steps."),
    ]


SPEED_NAMES = tuple(widget.id for widget in speed_widgets())


def sampler_input() -> io.Input:
    return NextStepSamplerType.Input(
        "sampler_settings", optional=True,
        tooltip="Optional: a NextStep Sampler's settings. Connected, they replace this node's steps, sampler, "
                "shift, noise_level, cfg_schedule, use_norm and velocity_norm.")


def shared_sampler(values: dict, sampler_settings: dict | None) -> dict:
    """The sampling widgets' values with a connected NextStep Sampler's in place of the node's own."""
    return values if sampler_settings is None else {**values, **sampler_settings}


class NextStepSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NextStepSampler",
            display_name="NextStep Sampler",
            category="NextStep",
            description="How every image token is sampled, set once for the NextStep sampling nodes it is connected "
                        "to (their sampler_settings input); it replaces their own sampler widgets.",
            inputs=[*sampler_widgets(), *speed_widgets()],
            outputs=[NextStepSamplerType.Output("sampler_settings", display_name="sampler_settings",
                                                tooltip="For the sampler_settings input of the NextStep sampling "
                                                        "nodes.")],
        )

    @classmethod
    def execute(cls, **settings) -> io.NodeOutput:
        speed = {name: settings.get(name, 0) for name in SPEED_NAMES}  # optional: 0, off, when left out
        return io.NodeOutput({**{name: settings[name] for name in SAMPLER_NAMES}, **speed})


NODES = [NextStepSampler]
