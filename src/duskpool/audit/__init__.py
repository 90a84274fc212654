"""What a node could learn: `run_audit` pushes held-out prompts through the model as the gateway would,
hands the hidden states each node would receive to attackers that know the public model, and reports how
many prompt and answer tokens they recover at each privacy-prefix and -suffix depth (docs/privacy.md)."""

from duskpool.audit.measure import DEFAULT_MAX_PREFIX, DEFAULT_MAX_SUFFIX, run_audit
from duskpool.audit.report import AuditReport

__all__ = ["DEFAULT_MAX_PREFIX", "DEFAULT_MAX_SUFFIX", "AuditReport", "run_audit"]
