"""
Checking a tarball against its packument's C{dist.integrity} (Subresource
Integrity) and C{dist.shasum}. Blocking: run on the disk pool.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

#: Strongest first, as the npm client picks.
_ALGORITHMS = ("sha512", "sha384", "sha256", "sha1")
_READ = 1 << 20


class IntegrityMismatch(ValueError):
    pass


def _strongest(integrity: str) -> tuple[str, list[bytes]] | None:
    candidates: dict[str, list[bytes]] = {}
    for token in integrity.split():
        algorithm, _, rest = token.partition("-")
        digest = rest.split("?", 1)[0]
        if algorithm in _ALGORITHMS:
            try:
                candidates.setdefault(algorithm, []).append(base64.b64decode(digest, validate=True))
            except ValueError:
                continue
    for algorithm in _ALGORITHMS:
        if algorithm in candidates:
            return algorithm, candidates[algorithm]
    return None


def check_tarball(path: str, integrity: str | None, shasum: str | None) -> None:
    """
    Raise L{IntegrityMismatch} unless the file matches every digest the
    packument gives (at least one must be given).
    """
    wanted = _strongest(integrity) if isinstance(integrity, str) else None
    shasum = shasum.strip().lower() if isinstance(shasum, str) else None
    if wanted is None and not shasum:
        raise IntegrityMismatch("the packument gives no integrity or shasum for this tarball")
    sri = hashlib.new(wanted[0]) if wanted else None
    sha1 = hashlib.sha1() if shasum else None
    with open(path, "rb") as f:
        while chunk := f.read(_READ):
            if sri is not None:
                sri.update(chunk)
            if sha1 is not None:
                sha1.update(chunk)
    # Like ssri: any of the strongest algorithm's digests may match.
    if wanted is not None and sri is not None and not any(
        hmac.compare_digest(sri.digest(), digest) for digest in wanted[1]
    ):
        raise IntegrityMismatch(f"{wanted[0]} integrity does not match")
    if shasum and sha1 is not None and not hmac.compare_digest(sha1.hexdigest(), shasum):
        raise IntegrityMismatch("shasum does not match")
