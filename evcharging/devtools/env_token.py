"""``make up``: make sure ``.env`` holds an API token before Docker Compose starts.

Compose binds every service on the containers' network, so SPEC §5's protected mode needs
a token there. When ``.env`` is missing it is copied from ``.env.example``; when it has
no ``EVCHARGING_API_TOKEN`` (or an empty one) a random one is appended. An existing token
is never changed. Standard library only: it runs before any virtualenv exists.

    python3 -m evcharging.devtools.env_token [.env] [.env.example]
"""

from __future__ import annotations

import re
import secrets
import shutil
import sys
from pathlib import Path

VARIABLE = "EVCHARGING_API_TOKEN"
_SET = re.compile(rf"^[ \t]*{VARIABLE}[ \t]*=[ \t]*\S", re.MULTILINE)


def ensure_token(env: Path, example: Path) -> str | None:
    """Make `env` hold a token; returns what was done, in words, or None if nothing."""
    done = []
    if not env.exists():
        if example.exists():
            shutil.copyfile(example, env)
        else:
            env.touch()
        done.append(f"created {env} from {example.name}")
    text = env.read_text(encoding="utf-8")
    if not _SET.search(text):
        separator = "" if not text or text.endswith("\n") else "\n"
        token = secrets.token_urlsafe(32)
        with env.open("a", encoding="utf-8") as out:
            out.write(f"{separator}# Written by `make up`: every service's API token (SPEC §5)."
                      f"\n{VARIABLE}={token}\n")
        env.chmod(0o600)
        done.append(f"wrote a random {VARIABLE} into {env}")
    return "; ".join(done) or None


def main(argv: list[str]) -> int:
    env = Path(argv[0] if argv else ".env")
    example = Path(argv[1] if len(argv) > 1 else ".env.example")
    done = ensure_token(env, example)
    if done:
        sys.stderr.write(f"{done} (mutating calls need it: Authorization: Bearer <token>)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
