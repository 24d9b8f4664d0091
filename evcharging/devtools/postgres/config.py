"""The PostgreSQL tool's fixed settings, where things are kept (the CLI's work directories),
which binaries run, as which user, and the cluster's credentials."""

from __future__ import annotations

import grp
import hashlib
import json
import os
import pwd
import re
import secrets
import shutil
import stat
import subprocess
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from evcharging.devtools.postgres.errors import PostgresError

HOST = "127.0.0.1"
DEFAULT_PORT = 55432
"""Not 5432: Debian's own cluster (``postgresql@15-main``) may hold that one."""
DEFAULT_START_TIMEOUT = 60.0
DEFAULT_STOP_TIMEOUT = 20.0
INITDB_TIMEOUT = 120.0
DATABASE = "evcharging"
USER = "evcharging"
SUPERUSER = "postgres"
SERVICE_USER = "postgres"
"""The system user the server runs as when this tool runs as root."""
BIN_ENV = "EVCHARGING_POSTGRES_BIN"
HOME_ENV = "EVCHARGING_POSTGRES_HOME"
DEBIAN_LIB = Path("/usr/lib/postgresql")
MIN_MAJOR = 15

DATA_DIR = "data"
LOG_FILE = "postgres.log"
PASSWORDS_FILE = "passwords.json"
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def repo_root() -> Path:
    """The checkout this package runs from (else the working directory)."""
    candidate = Path(__file__).resolve().parents[3]
    return candidate if (candidate / "pyproject.toml").is_file() else Path.cwd()


def home_dir() -> Path:
    """Where the CLI's servers live: ``$EVCHARGING_POSTGRES_HOME``, else
    ``<repo>/.cache/postgres``; as root, when the ``postgres`` user may not enter the
    checkout (a clone in a ``mktemp -d`` folder, mode 700), a folder of this checkout's own
    under the system's temporary folder."""
    override = os.environ.get(HOME_ENV)
    if override:
        return Path(override).expanduser().resolve()
    home = repo_root() / ".cache" / "postgres"
    try:
        user = service_user()
    except PostgresError:
        return home  # reported when a server starts
    if user is None or unreachable_parent(home, user) is None:
        return home
    digest = hashlib.sha256(str(repo_root()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"evcharging-postgres-{digest}"


def run_dir(port: int) -> Path:
    """The work directory of the CLI server listening on ``port``."""
    return home_dir() / str(port)


def find_bin_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The folder with ``initdb`` and ``postgres``: ``explicit``, ``$EVCHARGING_POSTGRES_BIN``,
    the newest ``/usr/lib/postgresql/<version>/bin``, or the one of ``initdb`` on PATH."""
    chosen = explicit or os.environ.get(BIN_ENV)
    if chosen:
        candidates = [Path(chosen)]
    else:
        versions = sorted(
            (int(p.name), p / "bin") for p in DEBIAN_LIB.glob("*") if p.name.isdigit()
        ) if DEBIAN_LIB.is_dir() else []
        candidates = [bin_dir for _, bin_dir in reversed(versions)]
        on_path = shutil.which("initdb")
        if on_path:
            candidates.append(Path(on_path).resolve().parent)
    for bin_dir in candidates:
        if all(os.access(bin_dir / name, os.X_OK) for name in ("initdb", "postgres")):
            return bin_dir.resolve()
    where = f"${BIN_ENV}={chosen}" if chosen else f"{DEBIAN_LIB}/<version>/bin nor on PATH"
    raise PostgresError(
        f"PostgreSQL's initdb and postgres are not in {where}. Install Debian's PostgreSQL "
        "(`bash scripts/ensure_postgres.sh`, as root: apt-get install postgresql), or point "
        f"${BIN_ENV} at a folder that has them (PostgreSQL {MIN_MAJOR} or newer)."
    )


def server_major(bin_dir: Path) -> int:
    """The major version of ``bin_dir/postgres`` (``postgres (PostgreSQL) 15.18 ...``)."""
    out = subprocess.run(
        [str(bin_dir / "postgres"), "--version"], capture_output=True, text=True, check=False,
        timeout=30,
    ).stdout
    found = re.search(r"\(PostgreSQL\)\s+(\d+)", out)
    if not found:
        raise PostgresError(f"{bin_dir / 'postgres'} --version said {out.strip()!r}")
    return int(found.group(1))


@dataclass(frozen=True)


class RunAs:
    """The system user the server runs as (PostgreSQL refuses root)."""

    name: str
    uid: int
    gid: int


def service_user() -> RunAs | None:
    """None when we are not root (the server runs as we do), else the ``postgres`` user."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        raise PostgresError(
            f"PostgreSQL refuses to run as root, and there is no system user {SERVICE_USER!r} "
            "to run it as (Debian's postgresql package creates it: "
            "`bash scripts/ensure_postgres.sh`); or run this tool as an ordinary user"
        ) from None
    return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid)


def unreachable_parent(path: Path, user: RunAs) -> Path | None:
    """The first folder above ``path`` that ``user`` may not enter, if any (``path`` itself
    is given to ``user``)."""
    groups = {user.gid, *(g.gr_gid for g in _groups_of(user.name))}
    for folder in reversed(path.parents):
        try:
            st = folder.stat()
        except FileNotFoundError:
            return None  # created later, by us, with the owner fixed
        if st.st_uid == user.uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return folder
    return None


def _groups_of(name: str) -> list[grp.struct_group]:
    return [g for g in grp.getgrall() if name in g.gr_mem]


@dataclass(frozen=True)


class Passwords:
    """The cluster's two passwords, made with it and kept beside it (mode 600)."""

    superuser: str
    user: str

    @classmethod
    def new(cls) -> Passwords:
        return cls(secrets.token_urlsafe(18), secrets.token_urlsafe(18))

    @classmethod
    def load(cls, work_dir: Path) -> Passwords | None:
        try:
            raw = json.loads((work_dir / PASSWORDS_FILE).read_text(encoding="utf-8"))
            return cls(str(raw["superuser"]), str(raw["user"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, work_dir: Path) -> None:
        path = work_dir / PASSWORDS_FILE
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)
        path.write_text(
            json.dumps({"superuser": self.superuser, "user": self.user}) + "\n", encoding="utf-8"
        )


def database_url(port: int, password: str, database: str = DATABASE, user: str = USER) -> str:
    """``postgresql://user:password@127.0.0.1:port/database`` (Central's CENTRAL_DB_URL)."""
    secret = urllib.parse.quote(password, safe="")
    return f"postgresql://{user}:{secret}@{HOST}:{port}/{database}"


def check_identifier(name: str) -> str:
    """``name`` if it is a plain lower-case SQL identifier (a database we create or drop)."""
    if not _IDENTIFIER.fullmatch(name):
        raise PostgresError(
            f"bad database name {name!r}: use 1 to 63 of a-z, 0-9 and _, not starting with a digit"
        )
    return name
