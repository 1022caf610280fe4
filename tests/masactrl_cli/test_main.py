"""The ``masactrl`` entry point: subcommands are imported lazily, so parsing never imports torch."""

from __future__ import annotations

import subprocess
import sys


def test_main_module_does_not_import_torch() -> None:
    # `masactrl serve` must never import torch: neither parsing nor --help of a subcommand may.
    code = (
        "import sys\n"
        "from masactrl_cli.main import main\n"
        "assert main(['--help']) == 0\n"
        "assert main(['synthesize', '--help']) == 0\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "--target-prompt" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "False"
