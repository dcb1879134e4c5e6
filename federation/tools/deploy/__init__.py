"""A whole federation on real Flower processes: one SuperLink, one SuperNode per site.

:func:`run.deploy` starts ``flower-superlink`` and one ``flower-supernode`` per site (its node
config names the site and its own data directory and key file; ``commands``), generates TLS
certificates and SuperNode authentication keys on request (``pki``), submits the app with
``flwr run`` against that SuperLink (the connection lives in a private ``FLWR_HOME``), waits
for the run, and stops every process it started, on success, failure, timeout, Ctrl-C or
SIGTERM alike: each is started in its own process group, and its descendants (Flower's
SuperExec, ServerApp and ClientApp processes) are found through ``/proc`` and stopped with it
(``processes``).

:func:`commands.site_command` is what a hospital runs on its own host to join the federation.

Flower 1.41 and 1.42 facts this relies on: the SuperLink serves its Fleet, Control and
Runtime APIs on one HTTP port; a SuperNode serves its ClientApps on a local port of its own; runtime
dependency installation must be off (the app runs in this virtualenv); SuperNode
authentication needs TLS and the nodes' public keys registered with ``flwr supernode
register`` before they connect.
"""


class DeployError(RuntimeError):
    """The federation could not be started or did not finish."""
