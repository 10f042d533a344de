"""Training and measuring the model: python -m train, train.evaluate, train.photos."""

from __future__ import annotations

import argparse


class DefaultsHelp(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help with each option's default, where it has one (not for required or unset options),
    and the description and epilog as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)
