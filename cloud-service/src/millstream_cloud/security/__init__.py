"""Security: device identities, broker ACLs, API tokens, abuse limits (docs/security.md).

- :mod:`.pki` a private CA: server and client certificates, CRL, expiry report
- :mod:`.devices` provisioning: one certificate per device, agent config, revocation
- :mod:`.acl` the Mosquitto ACL and TLS config generated from the device registry
- :mod:`.tokens` API tokens with scopes (read, write, admin), stored hashed
- :mod:`.auth` ``install_auth(app, settings)``: scopes on every route, body limit, CORS
- :mod:`.limits` per-device rate limiter (``allow(device, now)``) and payload limit
- :mod:`.cli` ``millstream-cloud pki|devices|tokens``
"""
