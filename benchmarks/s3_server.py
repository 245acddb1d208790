"""moto's S3 server, with ranged GETs that read only the bytes asked for.

Stock moto answers ``GET`` with ``Range: bytes=a-b`` by reading the whole object and slicing
it, so each ranged read of a 1 GB object costs about as much as reading the object (measured
in benchmarks/s3_tiling.py). S3 and MinIO read only the range. This launcher patches that one
path, ``S3Response.get_object`` for a single ``bytes=a-b`` range, to seek and read the range
under the key's lock and answer 206 with the same headers moto sends; everything else is
moto as it comes.

    python benchmarks/s3_server.py -H 127.0.0.1 -p 5000
"""

from __future__ import annotations

import re
from typing import Any

from moto.s3.responses import S3Response
from moto.server import main

RANGE = re.compile(r"bytes=(\d+)-(\d+)")
_stock_get_object = S3Response.get_object


def _get_object(self: Any) -> Any:
    match = RANGE.fullmatch(str(self.headers.get("range", "")).strip())
    if match is None or "partNumber" in self.querystring:
        return _stock_get_object(self)
    key, not_modified = self._get_key()
    begin, end = int(match[1]), min(int(match[2]), key.size - 1)
    if not_modified or begin > end:
        return _stock_get_object(self)
    with key.lock:
        key._value_buffer.seek(begin)
        data = key._value_buffer.read(end - begin + 1)
    headers = {**self._get_cors_headers_other(), **key.response_dict, **key.metadata,
               "Accept-Ranges": "bytes", "content-length": str(len(data)),
               "content-range": f"bytes {begin}-{end}/{key.size}"}
    return 206, headers, data


S3Response.get_object = _get_object  # type: ignore[method-assign]

if __name__ == "__main__":
    main()
