"""``finegrain <command> --accelerate_config NAME|FILE --num_processes N ...``: re-launch through ``accelerate launch``.

As with TRL's CLI, the training commands accept a few launcher options. When one is given, ``finegrain`` does not
train in this process: it starts ``python -m accelerate.commands.launch --config_file <preset> [launcher options]
-m finegrain.cli.main <command> <the other options>`` and returns its exit status. The child processes never see
the launcher options, so they train normally.

Presets shipped in ``finegrain/accelerate_configs/`` (every key commented): ``single_gpu``, ``multi_gpu`` (DDP),
``fsdp2``, ``zero2``, ``zero3``. A path to any accelerate config file works too. ``--num_processes`` alone picks
``multi_gpu`` (or ``single_gpu`` for 1). On a machine without GPUs ``multi_gpu`` runs CPU processes over gloo.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

from finegrain.errors import ConfigError

PRESETS = ("single_gpu", "multi_gpu", "fsdp2", "zero2", "zero3")
# launcher options (each takes one value); accelerate launch gets them under the same names, but
# --accelerate_config, which is resolved to --config_file
LAUNCH_OPTIONS = ("--accelerate_config", "--num_processes", "--num_machines", "--machine_rank",
                  "--main_process_ip", "--main_process_port")
# commands that train and so may be launched on several processes
LAUNCHABLE = ("sft", "po", "rm", "ppo")


def preset_path(name_or_path: str) -> Path:
    """The accelerate config file for a preset name (``zero3``) or an existing file path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml", ".json") or path.exists():
        if not path.is_file():
            raise ConfigError(f"--accelerate_config {name_or_path}: no such file")
        return path
    if name_or_path not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name_or_path, PRESETS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"--accelerate_config {name_or_path!r}: not a preset{hint}; choose one of "
                          f"{', '.join(PRESETS)} or give the path of an accelerate config file")
    return Path(str(resources.files("finegrain").joinpath("accelerate_configs", f"{name_or_path}.yaml")))


def wants_launch(argv: list[str]) -> bool:
    """Whether ``argv`` (the command's options) holds any launcher option."""
    return any(_flag_key(a) in LAUNCH_OPTIONS for a in argv)


def _flag_key(arg: str) -> str:
    """``--num-processes=2`` -> ``--num_processes`` (both spellings, as for every finegrain option)."""
    flag = arg.split("=", 1)[0]
    return "--" + flag[2:].replace("-", "_") if flag.startswith("--") else flag


def split_launch_args(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Separate the launcher options (``{'--num_processes': '2', ...}``) from the command's own options."""
    launch: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        flag, eq, value = arg.partition("=")
        key = _flag_key(arg)
        if key in LAUNCH_OPTIONS:
            if not eq:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise ConfigError(f"option '{flag}' needs a value")
                value = argv[i + 1]
                i += 1
            launch[key] = value
        else:
            rest.append(arg)
        i += 1
    n = launch.get("--num_processes")
    if n is not None and (not n.isdigit() or int(n) < 1):
        raise ConfigError(f"option '--num_processes' must be a positive integer, got {n!r}")
    return launch, rest


def launch_command_line(command: str, argv: list[str]) -> list[str]:
    """The ``accelerate launch`` command line that runs ``finegrain <command> argv`` as configured."""
    launch, rest = split_launch_args(argv)
    name = launch.pop("--accelerate_config", None)
    if name is None:
        name = "multi_gpu" if int(launch.get("--num_processes", "1")) > 1 else "single_gpu"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(preset_path(name))]
    for key, value in launch.items():
        cmd += [key, value]
    return cmd + ["-m", "finegrain.cli.main", command, *rest]


def relaunch(command: str, argv: list[str]) -> int:
    """Run ``finegrain <command>`` (one of :data:`LAUNCHABLE`) under ``accelerate launch`` and return its exit status.

    Ctrl-C reaches the training processes directly (they share the terminal's process group), which write a
    checkpoint and stop; this process waits for them and returns their status (130 when interrupted).
    """
    cmd = launch_command_line(command, argv)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # accelerate would otherwise warn and guess per process
    proc = subprocess.Popen(cmd, env=env)
    while True:
        try:
            rc = proc.wait()
            break
        except KeyboardInterrupt:  # the children got the same Ctrl-C: wait for their checkpoint
            continue
    return 130 if rc in (130, -2) else rc
