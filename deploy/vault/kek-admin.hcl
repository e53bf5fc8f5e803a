# kek-admin: held by the KEK operators (security / platform on-call), never by the gateway
# and never by the people who add provider keys.
#
# Why: this role owns the Transit key `transit/asc-kek` that wraps every provider
# secret's data key (DEK). It may create the key, rotate it, tune its configuration
# (min_decryption_version after a rewrap sweep, auto_rotate_period) and rewrap wrapped
# DEKs to the newest version, an operation that never reveals a DEK. Separation of
# duties: it can neither read nor write the provider-key records in KV, nor decrypt, so
# holding the KEK never gives access to a provider key, and KEK operators never add one.
#
# Paths assume the Transit mount `transit/`, the key `asc-kek` and the KV v2 mount
# `secret/` with records under `asc/`; edit all three policies together if yours differ.

# Create the key (derived=true, so Transit honours the per-record context) and read its
# metadata: versions, latest_version, min_decryption_version.
path "transit/keys/asc-kek" {
  capabilities = ["create", "read", "update"]
}

path "transit/keys/asc-kek/rotate" {
  capabilities = ["update"]
}

# min_decryption_version, min_encryption_version, auto_rotate_period.
path "transit/keys/asc-kek/config" {
  capabilities = ["update"]
}

# Rewrap moves a wrapped DEK to the newest key version server-side; the DEK stays inside.
path "transit/rewrap/asc-kek" {
  capabilities = ["update"]
}

# Explicit denials win over grants from any other policy attached to the same token.
# Anything that yields a DEK or the key itself:
path "transit/decrypt/*" {
  capabilities = ["deny"]
}

path "transit/datakey/*" {
  capabilities = ["deny"]
}

path "transit/export/*" {
  capabilities = ["deny"]
}

path "transit/backup/*" {
  capabilities = ["deny"]
}

# Provider-key records: not the KEK operators' business.
path "secret/data/asc/*" {
  capabilities = ["deny"]
}

path "secret/metadata/asc/*" {
  capabilities = ["deny"]
}
