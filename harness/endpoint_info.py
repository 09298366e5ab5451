"""``endpoint.json``: how a harness, a device or a script finds an endpoint.

Written atomically by the emulator once it is listening; read by ``LocalEndpoint``,
``fleetbench provision --endpoint-file`` and device programs.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class EndpointInfo:
    mqtt_host: str
    mqtt_port: int
    api_url: str
    ca_file: str
    region: str
    account_id: str
    data_dir: str
    mqtt_server_name: str = "localhost"
    pid: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EndpointInfo:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def write(self, path: Path) -> None:
        """Write atomically (tmp file + rename) so readers never see half a file."""
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: Path) -> EndpointInfo:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a valid endpoint.json: {exc}") from exc
        missing = [k for k in ("mqtt_host", "mqtt_port", "api_url", "ca_file") if k not in data]
        if missing:
            raise ValueError(f"{path}: endpoint.json lacks {', '.join(missing)}")
        return cls.from_dict(data)
