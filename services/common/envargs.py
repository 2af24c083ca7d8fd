"""Flags that fall back to a TANDEM_* variable, checked exactly like the flag.

A variable's text is given to argparse as the flag's default *text*: argparse converts a string
default with the flag's own ``type=`` when the flag is absent from the command line (the flag
wins), so the variable goes through the same conversion, and the command's checks after parsing,
as the flag. EnvParser then names the variable in front of the flag's own message:

    tandem-edge: error: TANDEM_EDGE_PORT=abc: argument --port: invalid int value: 'abc'
"""

from __future__ import annotations

import argparse
import re
from typing import Any, NoReturn

# The flag an error is about: argparse's "argument --port[/--no-port]: ..." or a command's "--port: ...".
_FLAG = re.compile(r"(?:argument )?(--?[^\s:/]+)")


class EnvValue(str):
    """A variable's text that remembers the variable's name."""

    variable: str

    def __new__(cls, text: str, variable: str) -> EnvValue:
        value = super().__new__(cls, text)
        value.variable = variable
        return value


class EnvParser(argparse.ArgumentParser):
    """argparse whose errors about a flag that took its value from a variable name the variable,
    also for the checks a command makes after parsing (``parser.error("--flag: ...")``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._from_env: dict[str, EnvValue] = {}

    def parse_known_args(self, *args: Any, **kwargs: Any) -> Any:
        self._from_env = {}
        return super().parse_known_args(*args, **kwargs)

    def _get_value(self, action: argparse.Action, arg_string: str) -> Any:
        # argparse hands a string default here only when the flag is not on the command line
        if isinstance(arg_string, EnvValue):
            self._from_env.update(dict.fromkeys(action.option_strings, arg_string))
            arg_string = str(arg_string)  # the parsed values are plain: a text flag's too
        return super()._get_value(action, arg_string)

    def name_variable(self, message: str) -> str:
        """``message`` with ``VARIABLE=value: `` in front when its flag's value came from one."""
        flag = _FLAG.match(message)
        value = self._from_env.get(flag.group(1)) if flag else None
        return f"{value.variable}={value}: {message}" if value is not None else message

    def error(self, message: str) -> NoReturn:
        super().error(self.name_variable(message))
