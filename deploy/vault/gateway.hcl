# gateway: held by the running extproc replicas (AppRole `asc-gateway`, or a token
# from a Vault Agent sink).
#
# Why: at run time the gateway only needs to read provider-key records and unwrap their
# DEKs. It cannot seal new keys (no encrypt), write or delete records, rewrap, or touch
# the Transit key, so a compromised replica cannot plant, replace or lock out keys;
# at worst it can decrypt what it already serves.
#
# Paths assume the Transit mount `transit/`, the key `asc-kek` and the KV v2 mount
# `secret/` with records under `asc/`; edit all three policies together if yours differ.

path "transit/decrypt/asc-kek" {
  capabilities = ["update"]
}

path "secret/data/asc/*" {
  capabilities = ["read"]
}

path "secret/metadata/asc/*" {
  capabilities = ["read", "list"]
}

# Explicit denials win over grants from any other policy attached to the same token.
path "transit/keys/*" {
  capabilities = ["deny"]
}
