"""Data: ``--data`` specs, document reading, token packing, and the overlap (contamination) check."""

from evoreap.data.loader import TokenData, load_tokens, read_documents
from evoreap.data.spec import DataSource, parse_data_spec

__all__ = ["DataSource", "TokenData", "load_tokens", "parse_data_spec", "read_documents"]
