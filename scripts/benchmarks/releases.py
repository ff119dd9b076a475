"""A sealed image registered as a release in a gateway's registry (the benches' shared set-up)."""

from __future__ import annotations

from gateway.registry import Registry
from gateway.state import Workspace
from protocol import bundles, ids, image
from protocol.ids import Product, ReleaseId


def register_release(
    registry: Registry,
    workspace: Workspace,
    sealed: bytes,
    cek: bytes,
    *,
    product: Product,
    version: str,
) -> ReleaseId:
    """Add ``sealed`` (sealed under ``cek``) as a release of ``product``, its CEK wrapped to the
    workspace gateway's HPKE key, as ``edgeseal-gateway import`` would; its id."""
    digest = image.manifest_digest(image.parse_unverified_image(sealed))
    release = ids.release_id(digest)
    with workspace.open_kms() as kms:
        wrapped = bundles.wrap_release_cek(cek, kms.hpke_public_key(), digest)
    registry.add_release(
        release,
        product=product,
        version=version,
        security_counter=1,
        sealed_image=sealed,
        wrapped_cek=wrapped,
        created_s=1,
        now_s=1,
    )
    return release
