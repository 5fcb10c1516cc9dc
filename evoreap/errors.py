"""evoreap's exceptions. Library code raises these with messages in library terms; the CLI turns them into one line
and an exit code (bad input: 2, failure at run time: 1), spelling settings as the options that set them."""


class EvoreapError(RuntimeError):
    """Something went wrong at run time; the message says what and what to do. CLI exit code 1."""

    exit_code = 1

    def cli_message(self) -> str:
        return str(self)


class UsageError(EvoreapError, ValueError):
    """An argument or an input file is wrong. CLI exit code 2."""

    exit_code = 2


class SettingError(UsageError):
    """A setting has a bad value. ``template`` holds ``{name}`` where the setting is named: the library shows the
    setting's name (``batch_size``), the CLI the option that sets it (``--batch-size``)."""

    def __init__(self, setting: str, template: str):
        self.setting = setting
        self.template = template
        super().__init__(template.format(name=setting))

    def cli_message(self) -> str:
        return self.template.format(name="--" + self.setting.replace("_", "-"))


class UnsupportedModelError(EvoreapError):
    """The model is not a routed MoE evoreap knows."""


class RegistryError(UsageError):
    """A registration was refused: the name is taken (by a built-in or an earlier registration) or not a name."""
