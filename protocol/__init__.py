"""edgeseal's wire and file formats and its attestation state machines, free of I/O.

Everything here is pure: time comes in as ``now_s``, randomness as bytes and keys as objects. The
device, the gateway and provisioning all speak through these modules (DESIGN §2).
"""
