"""Audit records: one per request, chained, signed, written off the hot path.

`record.record_from` builds a request's record; `writer.AuditWriter` queues, chains
(`chain.Chain`) and writes it to its sinks (`sinks`); `verify` and `query` read the files
back. docs/audit.md is the operator's guide.
"""
