"""The `[safety]` section of the TOML config: whether the checker runs, and the score each tolerance flags at.

open_nsfw scores an image from 0 (safe) to 1 (NSFW). Yahoo's guidance for the model: below 0.2 an image is
safe with high probability, above 0.8 NSFW with high probability, the band between is degrees of
suggestiveness. An image is flagged when its score is at or above its tolerance's threshold:

* "1" 0.20: the strictest flags whatever is not clearly safe (false positives on skin-toned scenes: a plain
  beige image scores 0.25);
* "2" 0.85: the cut-off of BFL's reference filter, past Yahoo's 0.8 — the default of [pro]/[max], and what
  [dev] (and LoRA) endpoints are checked at;
* "3" to "5": roughly even steps towards "6";
* "6" 0.99: the most permissive still withholds near-certain NSFW: no tolerance turns the filter off (the
  FLUX.1 [dev] licence asks for one). The operator can, explicitly (`enabled = false`, warned at start-up).
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kontextd.routing import ConfigError, read_toml

TOLERANCES = (1, 2, 3, 4, 5, 6)
DEV_TOLERANCE = 2  # endpoints without safety_tolerance ([dev], LoRA) are checked as [pro]'s default is
DEFAULT_THRESHOLDS: Mapping[int, float] = {1: 0.20, 2: 0.85, 3: 0.88, 4: 0.92, 5: 0.95, 6: 0.99}
DEFAULT_THREADS = 1  # onnxruntime threads per check: ~35 ms an image on one core (docs/performance.md)
MAX_THREADS = 16

LICENCE_WARNING = (
    "safety checker off: images the local model makes are returned unchecked. The FLUX.1 [dev] licence "
    "requires filters or manual review of its outputs: review them yourself, or turn the checker back on"
)


@dataclass(frozen=True)
class SafetyConfig:
    enabled: bool = True
    thresholds: Mapping[int, float] = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))
    threads: int = DEFAULT_THREADS  # onnxruntime intra-op threads of the one session per process
    disabled_by: str = ""  # the setting that turned it off, for the start-up warning

    def threshold(self, tolerance: int) -> float:
        return self.thresholds[tolerance]


def load_safety(config_file: Path | None, flag_enabled: bool = True) -> SafetyConfig:
    """The `[safety]` section of `config_file` (none: the defaults); `flag_enabled` False is
    --no-safety-checker (KONTEXTD_NO_SAFETY_CHECKER), which turns it off whatever the file says."""
    section = read_toml(config_file).get("safety", {}) if config_file is not None else {}
    config = parse_safety(section, f"{config_file}: [safety]")
    if not flag_enabled:
        return SafetyConfig(False, config.thresholds, config.threads, "--no-safety-checker")
    return config


def parse_safety(section: Any, where: str = "[safety]") -> SafetyConfig:
    if not isinstance(section, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = set(section) - {"enabled", "thresholds", "threads"}
    if unknown:
        raise ConfigError(
            f"{where}: unknown setting(s) {sorted(unknown)}; expected enabled, thresholds, threads"
        )
    enabled = section.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{where} enabled must be true or false, not {enabled!r}")
    threads = section.get("threads", DEFAULT_THREADS)
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise ConfigError(f"{where} threads must be a whole number from 1 to {MAX_THREADS}, not {threads!r}")
    thresholds = dict(DEFAULT_THRESHOLDS) | _thresholds(section.get("thresholds", {}), where)
    ordered = [thresholds[tolerance] for tolerance in TOLERANCES]
    if ordered != sorted(ordered):  # a more permissive tolerance must never flag what a stricter one lets by
        shown = ", ".join(f'"{tolerance}" = {thresholds[tolerance]:g}' for tolerance in TOLERANCES)
        raise ConfigError(f'{where} thresholds must not decrease from "1" to "6": {shown}')
    disabled_by = "" if enabled else f"{where} enabled = false"
    return SafetyConfig(enabled, thresholds, threads, disabled_by)


def _thresholds(table: Any, where: str) -> dict[int, float]:
    if not isinstance(table, dict):
        raise ConfigError(f'{where} thresholds must be a table like {{ "1" = 0.2, "2" = 0.85 }}')
    thresholds = {}
    for key, value in table.items():
        if key not in {str(tolerance) for tolerance in TOLERANCES}:
            raise ConfigError(f'{where} thresholds: unknown tolerance "{key}"; expected "1" to "6"')
        # Above 1 would never flag: turning the checker off is `enabled = false`, which says so.
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise ConfigError(f'{where} thresholds."{key}" must be a score from 0 to 1, not {value!r}')
        thresholds[int(key)] = float(value)
    return thresholds
