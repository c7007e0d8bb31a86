"""Names the ``fedfusion`` command accepts, checked against the registries, with "did you mean".

A typo such as ``--fusion attn`` used to surface as a traceback from deep inside model building (or,
for ``fedfusion run``, as a ServerApp failure minutes later on the coordinator). Each check here names
the flag, the bad value, every valid choice and the closest one. The registries are the truth
(``fedfusion.simulations.datasets.list_datasets``, ``fedfusion.common.models``' fusion and backbone
registries), imported only when the parsed command carries such a flag, so ``fedfusion --help`` and
``site check`` stay fast. The registries load installed plug-ins (``fedfusion.models`` and
``fedfusion.datasets`` entry points, docs/plugins.md) before answering, so plug-in names are valid
choices; a plug-in that failed to load is named after the choices, since the name asked for may be its.

Parse errors are one line too (:class:`OneLineParser`): argparse's default prints the whole usage of
a sub-command with 40 flags above the error, burying it.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

_INVALID_CHOICE = re.compile(r"invalid choice: '(?P<value>[^']*)' \(choose from (?P<choices>.*)\)")


def did_you_mean(value: str, choices: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or an empty string when none is close."""
    close = difflib.get_close_matches(value.lower(), [c.lower() for c in choices], n=1, cutoff=0.5)
    if not close:
        prefixed = [c for c in choices if c.lower().startswith(value.lower())] if value else []
        close = prefixed[:1]
    if not close:
        return ""
    original = next(c for c in choices if c.lower() == close[0].lower())
    return f" (did you mean {original!r}?)"


def choice_error(flag: str, value: str, choices: Sequence[str]) -> str:
    """One line: the flag, the bad value, the closest valid one and all valid ones."""
    return f"{flag} {value!r} is not a valid choice{did_you_mean(value, choices)}; choose from: {', '.join(choices)}"


def _dataset_problem(flag: str, value: str) -> str | None:
    from fedfusion.common.plugins import DATASETS_GROUP, failure_note
    from fedfusion.simulations.datasets import dataset_names

    names = dataset_names()
    if value in names:
        return None
    if "/" in value or "\\" in value or Path(value).exists():
        return (f"{flag} takes the name of a shipped data set ({', '.join(names)}), not a path; for your own "
                f"per-site folders use --sites-dir {value}")
    return choice_error(flag, value, names) + failure_note(DATASETS_GROUP)


def _fusion_problem(value: str) -> str | None:
    from fedfusion.common.models import list_fusions
    from fedfusion.common.models.registry import unknown_note

    names = list_fusions()
    return None if value in names else choice_error("--fusion", value, names) + unknown_note()


def _backbone_problem(value: str) -> str | None:
    from fedfusion.common.models import list_image_backbones
    from fedfusion.common.models.registry import unknown_note

    names = list_image_backbones()
    if value in names or value.startswith("timm:"):
        return None
    return choice_error("--backbone", value, [*names, "timm:<any timm model>"]) + unknown_note()


def check_choices(args: argparse.Namespace) -> str | None:
    """The first registry name in ``args`` that does not exist, as one line; None when all are valid."""
    if getattr(args, "command", None) == "datasets" and getattr(args, "datasets_command", None) in ("build", "export"):
        return _dataset_problem("data set name", args.name)
    if getattr(args, "dataset", None) is not None:
        problem = _dataset_problem("--dataset", str(args.dataset))
        if problem:
            return problem
    if getattr(args, "fusion", None) is not None:
        problem = _fusion_problem(str(args.fusion))
        if problem:
            return problem
    if getattr(args, "backbone", None) is not None:
        return _backbone_problem(str(args.backbone))
    return None


def _dataset_choices() -> list[str]:
    from fedfusion.simulations.datasets import list_datasets

    return [info.name for info in list_datasets()]


def _fusion_choices() -> list[str]:
    from fedfusion.common.models import list_fusions

    return list(list_fusions())


def _backbone_choices() -> list[str]:
    from fedfusion.common.models import list_image_backbones

    return [*list_image_backbones(), "timm:<any timm model>"]


# Options whose valid values live in a registry (plug-ins included), not in argparse ``choices``: their help
# lists the registry's names, read only when that help is printed (the fusion registry imports torch).
HELP_CHOICES = {"--dataset": _dataset_choices, "--fusion": _fusion_choices, "--backbone": _backbone_choices}


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows each option's default, except where there is none to show (None/False) or the
    help text already explains it, and the registry's names for the options in :data:`HELP_CHOICES`."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in (action.help or ""):
            text = action.help
        else:
            text = super()._get_help_string(action)
        names = next((HELP_CHOICES[o] for o in action.option_strings if o in HELP_CHOICES), None)
        if names is not None and text != argparse.SUPPRESS:
            listed = ", ".join(names()).replace("%", "%%")
            text = f"{text} (choices: {listed})" if text else f"choices: {listed}"
        return text


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser (and, through ``add_subparsers``, every sub-command's) whose errors are one
    line on stderr with exit status 2, a "did you mean" for a mistyped choice, and defaults in help."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def add_argument(self, *args: object, **kwargs: object) -> argparse.Action:  # type: ignore[override]
        default = kwargs.get("default")
        if kwargs.get("help") is None and default is not None and default is not False:  # 0 is a default
            kwargs["help"] = "(default: %(default)s)"  # argparse prints nothing for an option without help
        return super().add_argument(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        found = _INVALID_CHOICE.search(message)
        if found:
            choices = [c.strip().strip("'") for c in found["choices"].split(",")]
            flag = message.split(":", 1)[0].removeprefix("argument ").split("/")[-1]
            message = choice_error(flag, found["value"], choices)
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def exit_on_bad_choice(args: argparse.Namespace, prog: str = "fedfusion") -> None:
    """Exit 2 with one line when ``args`` names something no registry holds."""
    problem = check_choices(args)
    if problem:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        raise SystemExit(2)
