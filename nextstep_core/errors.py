"""The one exception type the engine raises for problems the user can fix."""


class NextStepError(ValueError):
    """Bad input, a bad model folder or bad settings.

    The message always names the thing the user controls (a widget, a flag, a file),
    e.g. "width 1000 is not a multiple of 16" or "folder X has no config.json".
    """
