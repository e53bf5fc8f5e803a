# key-operator: held by the people (or the CI job) that add and rotate provider keys
# with `extproc keys add|rotate|rewrap`; never by KEK operators.
#
# Why: adding a provider key means sealing it (Transit encrypt of a fresh DEK) and
# writing the record to KV; checking or rewrapping a record needs decrypt and rewrap.
# Separation of duties: this role may use the Transit key but never manage it. It
# cannot rotate it, change min_decryption_version (which could lock every record out,
# or keep retired key versions usable) or even read its configuration.
#
# Paths assume the Transit mount `transit/`, the key `asc-kek` and the KV v2 mount
# `secret/` with records under `asc/`; edit all three policies together if yours differ.

# `update` only, never `create`: Transit's encrypt upserts a missing key (non-derived, so
# it would ignore contexts) for tokens holding `create`; with `update` a mistyped key
# name is refused (403) instead of minting a new KEK.
path "transit/encrypt/asc-kek" {
  capabilities = ["update"]
}

path "transit/decrypt/asc-kek" {
  capabilities = ["update"]
}

path "transit/rewrap/asc-kek" {
  capabilities = ["update"]
}

# Provider-key records (KV v2): data, plus metadata to list and delete versions.
path "secret/data/asc/*" {
  capabilities = ["create", "read", "update", "delete"]
}

path "secret/metadata/asc/*" {
  capabilities = ["read", "list", "delete"]
}

# Explicit denials win over grants from any other policy attached to the same token:
# no key creation, rotation, configuration, deletion or metadata reads.
path "transit/keys/*" {
  capabilities = ["deny"]
}
