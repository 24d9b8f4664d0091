"""``make up``: make sure ``.env`` holds an API token and the Kafka passwords before Docker
Compose starts.

Compose binds every service on the containers' network, so SPEC §5's protected mode needs
a token there. When ``.env`` is missing it is copied from ``.env.example``; when it has
no ``EVCHARGING_API_TOKEN`` (or an empty one) a random one is appended. An existing token
is never changed. Likewise the passwords of the Compose broker's users (SPEC §11):
``KAFKA_CENTRAL_PASSWORD``, ``KAFKA_CP_PASSWORD`` and ``KAFKA_DRIVER_PASSWORD`` (the
principals of the services), ``KAFKA_ADMIN_PASSWORD`` (the super user that sets up the users
and ACLs, and tools) and ``KAFKA_BROKER_PASSWORD`` (the broker's own); missing ones are
appended, existing ones kept; and ``POSTGRES_PASSWORD``, the Compose PostgreSQL's password of
Central's user (SPEC §9). Standard library only: it runs before any virtualenv exists.

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
KAFKA_PASSWORDS = tuple(f"KAFKA_{user}_PASSWORD"
                        for user in ("CENTRAL", "CP", "DRIVER", "ADMIN", "BROKER"))
POSTGRES_VARIABLES = ("POSTGRES_PASSWORD",)
"""The password of the user evcharging of Compose's PostgreSQL (Central's CENTRAL_DB_URL)."""


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


def ensure_kafka_passwords(
    env: Path, names: tuple[str, ...] = KAFKA_PASSWORDS,
    what: str = "the Kafka users' passwords (SPEC §11)",
) -> str | None:
    """Append a random password for each of `names` (:data:`KAFKA_PASSWORDS`) that `env`
    (which exists) does not set; returns what was done, in words, or None if nothing."""
    text = env.read_text(encoding="utf-8")
    missing = [name for name in names
               if not re.search(rf"^[ \t]*{name}[ \t]*=[ \t]*\S", text, re.MULTILINE)]
    if not missing:
        return None
    separator = "" if not text or text.endswith("\n") else "\n"
    with env.open("a", encoding="utf-8") as out:
        out.write(f"{separator}# Written by `make up`: {what}.\n")
        out.writelines(f"{name}={secrets.token_urlsafe(24)}\n" for name in missing)
    env.chmod(0o600)
    return f"wrote random {', '.join(missing)} into {env}"


def main(argv: list[str]) -> int:
    env = Path(argv[0] if argv else ".env")
    example = Path(argv[1] if len(argv) > 1 else ".env.example")
    done = ensure_token(env, example)
    if done:
        sys.stderr.write(f"{done} (mutating calls need it: Authorization: Bearer <token>)\n")
    done = ensure_kafka_passwords(env)
    if done:
        sys.stderr.write(f"{done} (the Compose broker's SASL users)\n")
    done = ensure_kafka_passwords(env, POSTGRES_VARIABLES, "the PostgreSQL password (SPEC §9)")
    if done:
        sys.stderr.write(f"{done} (Central's database in Compose)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
