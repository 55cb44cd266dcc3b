"""Offline validation of the STAC Items segflow writes."""

from __future__ import annotations

import json
from pathlib import Path


def validate_stac(doc: dict) -> None:
    """Validate a STAC Item with pystac's validator, offline: the core schemas come with
    pystac, the projection extension's from tests/data/stac."""
    import pystac
    from pystac.extensions.projection import ProjectionExtension
    from pystac.validation.stac_validator import JsonSchemaSTACValidator

    validator = JsonSchemaSTACValidator()
    schema = Path(__file__).parent / "data" / "stac" / "projection-v2.0.0-schema.json"
    validator.schema_cache[ProjectionExtension.get_schema_uri()] = json.loads(schema.read_text())
    pystac.validation.set_validator(validator)
    item = pystac.Item.from_dict(doc)
    assert item.validate()  # the schemas it was checked against
    assert ProjectionExtension.get_schema_uri() in item.stac_extensions
