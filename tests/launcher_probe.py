"""What a forked child sees, written as JSON: the entry point the launcher tests fork instead of `petl_bench.cli`."""

import json
import os
import signal
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    """``probe OUT [sleep SECONDS] [exit CODE]``: write argv, cwd, env, session and W&B's media folder to OUT."""
    out = Path(argv[0])
    media = sys.modules.get("wandb.sdk.data_types._private")
    folder = media.MEDIA_TMP.name if media is not None else None
    print("probe stdout")
    print("probe stderr", file=sys.stderr)
    out.write_text(json.dumps({
        "argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ), "pid": os.getpid(),
        "session_leader": os.getsid(0) == os.getpid(), "torch_preloaded": "torch" in sys.modules,
        "wandb_media": folder, "wandb_media_exists": folder is not None and os.path.isdir(folder),
        "sigint_handler": str(signal.getsignal(signal.SIGINT)),
    }))
    if "sleep" in argv:
        time.sleep(float(argv[argv.index("sleep") + 1]))
    return int(argv[argv.index("exit") + 1]) if "exit" in argv else 0
