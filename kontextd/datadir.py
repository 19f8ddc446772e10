"""The data directory's layout, and the rule that its secrets are private and never under what is served.

The database holds every key's prompts and inputs; the webhook key signs as this server. Both are created
mode 0600 (and tightened if an older release left them readable), and start-up refuses a layout where the
storage root would contain them, so no storage bug can ever hand them out.
"""

import os
from dataclasses import dataclass
from pathlib import Path

PRIVATE = 0o600


@dataclass(frozen=True)
class DataDir:
    root: Path

    @property
    def database(self) -> Path:
        return self.root / "jobs.sqlite3"

    @property
    def webhook_key(self) -> Path:
        return self.root / "webhook-ed25519.pem"

    @property
    def files(self) -> Path:
        return self.root / "files"

    @property
    def tls(self) -> Path:
        return self.root / "tls"

    def secrets(self) -> list[Path]:
        """Files nobody but this server's user may read: the database (with its journal, shared memory and
        lock files) and the webhook signing key."""
        database = self.database
        companions = [database.with_name(database.name + suffix) for suffix in ("-wal", "-shm", "-journal")]
        return [database, *companions, database.with_suffix(".lock"), self.webhook_key]

    def prepare(self, sqlite: bool = True) -> None:
        """Create the folders, make the database file private before SQLite first opens it (when the job
        store is that file), and refuse a storage root that would contain a secret. Raises ValueError
        saying which path is wrong."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.files.mkdir(exist_ok=True)
        served = self.files.resolve()
        for secret in self.secrets():
            if secret.resolve().is_relative_to(served):
                raise ValueError(f"{secret} would be under the storage root {served}: refusing to start")
        if sqlite:
            # SQLite creates its -wal and -shm files with the database file's mode, so this covers them too.
            os.close(os.open(self.database, os.O_CREAT | os.O_RDWR, PRIVATE))
        self.make_private()

    def make_private(self) -> None:
        """Tighten every secret that exists to 0600 (files an older release created 0644, say)."""
        for secret in self.secrets():
            if secret.exists() and not secret.is_symlink():
                os.chmod(secret, PRIVATE)
