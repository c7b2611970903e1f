"""The errors Platypus raises on purpose, and what each tells its caller to do.

Every one carries a message that is the whole story for a user: one line naming
what failed and what to change. ``pp`` and the agents print or report that line
and nothing else; the exception that caused it is kept (``raise ... from exc``)
for whoever debugs with a traceback in hand.

    PlatypusError                  a failure Platypus describes itself
    ├── IntentError (ValueError)   intent that does not validate: hold, report, wait
    │                              for an operator to fix the key the message names
    ├── SignatureError             a signature or key that cannot be trusted: refuse
    ├── StoreError                 the store refused (access rules, a bad URL): report
    │   └── StoreUnavailable       the store cannot be reached now: keep what you
    │                              have, retry with backoff
    ├── DockerError                the Docker engine or a registry failed (``pp pack
    │                              --docker``, the preparer's image versions); defined
    │                              here so catching it does not import the docker SDK
    └── the agents' errors, one per outside system they act on (each in its module):
        ├── FetchError             agents/system/fetch.py: a download failed
        │                          (``transient`` ones are retried in place)
        ├── ArchiveError           agents/system/archive.py: an artifact that cannot
        │                          or may not be extracted
        ├── RunitError             agents/system/runit.py: runsv is not there or refused
        ├── IptablesError          agents/system/iptables.py: the rules were not read
        │                          or not applied
        ├── ImdsError              agents/system/imds.py: no instance identity
        ├── AwsError               agents/system/aws.py
        │   ├── NotFound, AccessDenied
        │   └── Unavailable        AWS did not answer: retry
        └── ApplyError             agents/preparer/apply.py: an install failed (wraps a
                                   FetchError, ArchiveError or SignatureError)

Kept local, never seen outside the module that catches them: ``file_url.Refused``
(a ``file://`` URL refused; fetch turns it into a FetchError), the elb-registrar's
``StateError`` (its state file), and ``pp``'s own ``PPError``/``OperatorError``/
``PackError``, which its command group renders.

Anything else escaping an agent's converge is a bug: the runtime reports it as an
internal error and logs the traceback.
"""

from __future__ import annotations


class PlatypusError(Exception):
    """A failure Platypus describes itself; ``str()`` is the line a user sees."""


class IntentError(PlatypusError, ValueError):
    """Intent that does not validate; the message names the key and what to change."""


class SignatureError(PlatypusError):
    """An artifact's signature, or a key file, that cannot be trusted."""


class StoreError(PlatypusError):
    """A store operation failed for a reason other than the store being away."""


class StoreUnavailable(StoreError):
    """The store cannot be reached right now; callers keep what they have and retry."""


class DockerError(PlatypusError):
    """An engine or registry operation failed; the message is one line."""
