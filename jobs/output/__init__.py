"""The OUTPUT of a job that writes Parquet parts: one home for its protocol.

- parts.py: a part's name, bytes and atomic commit; listing and reading committed parts;
- lease.py: one job per OUTPUT, renewed by compare-and-swap, and the fencing check;
- store.py: which errors are the store's, and the one retry rule for them;
- resume.py: the scan that finds what is done and takes out what to redo;
- writer.py: PartsOutput (check, open, commit, close) and CommitBuffer (time-bounded commits).
"""

from jobs.output.lease import LEASE_NAME, Lease, LeaseLost, new_owner
from jobs.output.parts import DamagedPart, OutputError, committed_parts, is_part, part_name
from jobs.output.resume import ResumeIndex, path_digests, redo_mask, scan_parts
from jobs.output.store import OutputFull, StorePatience, StoreUnavailable, retry_store
from jobs.output.writer import CommitBuffer, OutputMode, PartsOutput, PartWriter, settings_difference

__all__ = ["CommitBuffer", "DamagedPart", "LEASE_NAME", "Lease", "LeaseLost", "OutputError", "OutputFull",
           "OutputMode", "PartWriter", "PartsOutput", "ResumeIndex", "StorePatience", "StoreUnavailable", "committed_parts",
           "is_part", "new_owner", "part_name", "path_digests", "redo_mask", "retry_store", "scan_parts",
           "settings_difference"]
