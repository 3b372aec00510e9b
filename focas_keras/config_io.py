"""JSON round trip and dotted overrides shared by the frozen dataclass configs."""

from __future__ import annotations

import dataclasses
import json
from typing import ClassVar

from focas_keras.errors import InputError


class SectionedConfig:
    """Mixin for a frozen dataclass config whose fields are section dataclasses (plus a few
    scalars). Subclasses name their sections in ``SECTIONS`` and provide ``validate()``."""

    SECTIONS: ClassVar[dict] = {}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict):
        """Inverse of :meth:`to_dict` (lists become tuples); unknown keys are an error."""
        if not isinstance(data, dict):
            raise InputError(f"config must be a JSON object, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in data.items():
            if key not in fields:
                raise InputError(f"unknown config key '{key}'")
            section_cls = cls.SECTIONS.get(key)
            if section_cls is None:
                kwargs[key] = value
                continue
            if not isinstance(value, dict):
                raise InputError(f"config section '{key}' must be an object")
            unknown = set(value) - {f.name for f in dataclasses.fields(section_cls)}
            if unknown:
                raise InputError(f"unknown config key(s) {key}.{', '.join(sorted(unknown))}")
            kwargs[key] = section_cls(**{k: tuple(v) if isinstance(v, list) else v
                                         for k, v in value.items()})
        return cls(**kwargs)

    def override(self, **dotted):
        """A validated copy with ``section.field=value`` overrides (None values are skipped)."""
        data = self.to_dict()
        for key, value in dotted.items():
            if value is None:
                continue
            section, _, field = key.partition(".")
            if field:
                if not isinstance(data.get(section), dict) or field not in data[section]:
                    raise InputError(f"unknown config field '{key}'")
                data[section][field] = value
            else:
                if section not in data or isinstance(data[section], dict):
                    raise InputError(f"unknown config field '{key}'")
                data[section] = value
        return type(self).from_dict(data).validate()


def is_integer(value) -> bool:
    """True for an int that is not a bool (JSON's true/false must not pass as 1/0)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """True for an int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
