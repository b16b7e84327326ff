"""High availability on Kubernetes: several ``serve`` replicas, one shared CA state, singleton work on the leader.

Every replica serves xDS and signs: the root is shared (the built-in provider keeps it in a Secret,
``ca.provider_options.store: kubernetes``), and each replica keeps its own intermediate signed by it. One
:class:`HaComponent` per replica (a :class:`~mesh_identity.server.service.Service` component) owns:

* **the election** (:class:`~mesh_identity.registry.kube.lease.LeaderElector`): the Lease
  ``registry.leader_election.lease_name`` in ``registry.namespace``, client-go's semantics and timing (15 s,
  10 s, 2 s). Only the holder does the singleton work below, and it asks the elector before each step, so a
  replica past its renew deadline never acts as leader; every write that work makes is fenced with the
  resourceVersion it read (the CA Secret, the ConfigMaps, the Leases), so a deposed leader's late write gets 409.
* **the follower** (every replica): the provider tells of CA state another replica wrote
  (:meth:`~mesh_identity.provider.CAProvider.watch_state`); the component's thread then reloads the provider and
  applies it (:meth:`~mesh_identity.rotation.roots.RootRotation.follow`): the bundle is served, and after an
  activation this replica's intermediate and every identity are renewed from the new root.
* **the replica evidence** (every replica): each retry period the replica renews its own Lease
  ``mesh-identity-replica-<identity>`` with its root-rotation evidence (:mod:`mesh_identity.server.evidence`):
  its phase, whether its proxies acknowledged the current bundle, how many still present a certificate
  chaining to an old root, a heartbeat. A replica that stops cleanly deletes its Lease.
* **the trust-bundle ConfigMaps** (leader): :class:`~mesh_identity.registry.kube.bundles.BundleConfigMaps`,
  started when this replica starts leading and stopped when it stops, fed by the engine's bundle source and
  the registry's monitored namespaces (with their garbage collection).
* **the rotation driver** (leader): while the provider's phase is not steady, every retry period it tries the
  next step (activate when prepared, retire when activated). It takes it only when its own gates pass
  (:class:`~mesh_identity.rotation.roots.RootRotation`) and every live replica (its Lease renewed within its
  lease duration, on the leader's clock) publishes evidence that allows it; expired replica Leases are
  deleted. It never prepares: a new leader that finds a rotation in progress finishes it, and one root only is
  ever added. The operator's ``prepare`` goes to the leader (a follower refuses every step, naming the leader);
  the driver takes the rest. An operator's ``activate``/``retire`` on the leader is gated the same way
  (``--force`` also gives up on the other replicas' evidence).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from mesh_identity.clock import Clock, utcnow
from mesh_identity.config import RegistryConfig, default_identity
from mesh_identity.errors import MeshIdentityError, RotationError
from mesh_identity.registry.kube.bundles import BundleConfigMaps
from mesh_identity.registry.kube.client import KubeClient
from mesh_identity.registry.kube.errors import KubeApiError
from mesh_identity.registry.kube.lease import LeaderElector, LeaseTiming, ReplicaLease, ReplicaLeases, micro_time
from mesh_identity.registry.kube.registry import KubernetesRegistry
from mesh_identity.rotation.roots import RootEvidence, RootStep, StepOverride
from mesh_identity.server.evidence import ANNOTATION, evidence_of, not_ready, parse_evidence
from mesh_identity.server.service import Service
from mesh_identity.svid import TrustBundle

log = logging.getLogger(__name__)

_NEXT = {"prepared": RootStep.ACTIVATE, "activated": RootStep.RETIRE}


class HaComponent:
    """See the module docstring. ``client`` is this component's own (closed at stop); ``registry`` gives the
    monitored namespaces (None: no trust-bundle ConfigMaps)."""

    def __init__(
        self,
        service: Service,
        client: KubeClient,
        settings: RegistryConfig,
        *,
        registry: KubernetesRegistry | None = None,
        timing: LeaseTiming | None = None,
        clock: Clock = utcnow,
    ) -> None:
        self.service = service
        self.roots = service.roots
        self.engine = service.engine
        self.provider = service.provider
        self.client = client
        self.registry = registry
        self.timing = timing or LeaseTiming()
        self.clock = clock
        self.namespace = settings.namespace
        self.identity = settings.leader_election.identity or default_identity()
        self.elector = LeaderElector(
            client,
            settings.namespace,
            settings.leader_election.lease_name,
            self.identity,
            timing=self.timing,
            on_started_leading=self._started_leading,
            on_stopped_leading=self._stopped_leading,
            clock=clock,
        )
        self.bundles = BundleConfigMaps(
            client, settings.mesh_name, retry_period=self.timing.retry_period, is_leader=self.is_leader
        )
        self.replica = ReplicaLease(client, settings.namespace, self.identity, timing=self.timing, clock=clock)
        self.replicas = ReplicaLeases(client, settings.namespace)
        self._wake = threading.Event()
        self._state_changed = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._unsubscribe: list[Callable[[], None]] = []
        self._noted: str | None = None
        self.followed = 0  # state changes applied
        self.steps_taken: list[str] = []  # the driver's steps, in order (for status and tests)

    def is_leader(self) -> bool:
        return self.elector.is_leader

    # -- lifecycle
    def start(self) -> None:
        self.provider.watch_state(self._changed)
        self._unsubscribe.append(self.engine.bundles.subscribe(lambda bundle: self.bundles.set_bundle(_pem(bundle))))
        current = self.engine.bundles.current()
        if current is not None:
            self.bundles.set_bundle(_pem(current))
        if self.registry is not None:
            self._unsubscribe.append(self.registry.subscribe_namespaces(self.bundles.set_namespaces))
            names = self.registry.namespaces()
            if names is not None:
                self.bundles.set_namespaces(names)
        self.service.root_stepper = self
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="ha-replica", daemon=True)
        self._thread.start()
        self.elector.start()

    def stop(self) -> None:
        """Stop the replica's loop, release the Lease (a leader steps down: the ConfigMap writer stops), delete
        this replica's Lease, and close the client."""
        self._stopping.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        self.elector.stop(release=True)
        self.bundles.stop()
        self.replica.delete()
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        if self.service.root_stepper is self:
            self.service.root_stepper = None
        self.client.close()

    def kill(self) -> None:
        """Stop as a process that died would (tests): no release, no step down written, the Leases expire."""
        self._stopping.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        self.elector.stop(release=False)
        self.bundles.stop()

    # -- leadership
    def _started_leading(self) -> None:
        log.info("HA: %s leads: trust-bundle ConfigMaps and the root rotation driver run here", self.identity)
        self.bundles.start()
        self._wake.set()

    def _stopped_leading(self) -> None:
        log.warning("HA: %s no longer leads", self.identity)
        self.bundles.stop()

    # -- the replica's thread
    def _changed(self) -> None:
        """The provider's callback: another replica changed the CA state."""
        self._state_changed.set()
        self._wake.set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            if self._state_changed.is_set():
                self._state_changed.clear()
                self._follow()
            try:
                evidence = self.roots.evidence()
                self._publish(evidence)
                if self.is_leader():
                    self._drive(evidence)
            except MeshIdentityError as err:
                log.warning("HA: %s", err)
            except Exception:  # a bug: logged, and the loop goes on
                log.exception("HA: the replica's loop failed")
            self._wake.wait(self.timing.retry_period)

    def _follow(self) -> None:
        try:
            self.provider.reload()
            done = self.roots.follow()
        except MeshIdentityError as err:
            log.warning("HA: cannot apply the CA state another replica wrote (retried): %s", err)
            self._state_changed.set()
            return
        self.followed += 1
        if done:
            log.info("HA: applied the CA state another replica wrote: %s", done)

    def _publish(self, evidence: RootEvidence) -> None:
        digest = evidence_of(evidence, self.engine.bundles.current(), self.identity, micro_time(self.clock()))
        self.replica.publish({ANNOTATION: digest.to_json()})

    # -- the rotation driver (leader)
    def _drive(self, evidence: RootEvidence) -> None:
        step = _NEXT.get(evidence.phase)
        if step is None:
            self._noted = None
            return
        blockers = self._replicas_blocking(step, evidence)
        if blockers:
            self._note(f"root rotation {step} waits: {blockers[0]}")
            return
        if not evidence.next_step.startswith("ready"):
            self._note(f"root rotation {step} waits: {evidence.next_step.removeprefix('waiting: ')}")
            return
        try:
            message = self.roots.step(step)
        except RotationError as err:
            self._note(str(err))
            return
        self._noted = None
        self.steps_taken.append(str(step))
        log.info("HA: the rotation driver took %s: %s", step, message)

    def _note(self, message: str) -> None:
        if message != self._noted:
            log.info("HA: %s", message)
        self._noted = message

    def _replicas_blocking(self, step: RootStep, evidence: RootEvidence) -> list[str]:
        """What the other live replicas' evidence says against ``step`` (empty: they allow it)."""
        try:
            live, expired = self.replicas.read()
        except KubeApiError as err:
            return [f"the replicas' Leases cannot be read: {err}"]
        for replica in expired:
            if self.is_leader():
                self.replicas.collect(replica)
        bundle = self.roots.authority.bundle()
        found = []
        for replica in live:
            if replica.identity == self.identity:
                continue  # this replica's own gates are checked by the step itself, on fresher evidence
            text = replica.annotations.get(ANNOTATION)
            if text is None:
                found.append(f"replica {replica.identity} has published no root-rotation evidence")
                continue
            try:
                theirs = parse_evidence(text)
            except ValueError as err:
                found.append(f"replica {replica.identity}: its evidence ({ANNOTATION}) does not read: {err}")
                continue
            reason = not_ready(theirs, step, bundle, evidence.new_root)
            if reason is not None:
                found.append(f"replica {replica.identity} {reason}")
        return found

    # -- the admin endpoint's steps
    def root_step(self, step: RootStep, override: StepOverride | None = None) -> str:
        """An operator's step: refused on a follower (naming the leader); on the leader, ``prepare`` starts a
        rotation the driver finishes, and ``activate``/``retire`` also wait for the other replicas' evidence
        (``--force`` gives up on it)."""
        if not self.is_leader():
            leader = self.elector.leader
            where = f"the leader is {leader}" if leader and leader != self.identity else "no leader is elected now"
            raise RotationError(
                f"replica {self.identity} is not the leader ({where}): root rotation steps are taken by the leader; "
                "send the step to its admin endpoint"
            )
        if step is not RootStep.PREPARE and (override is None or override.force is None):
            blockers = self._replicas_blocking(step, self.roots.evidence())
            if blockers:
                raise RotationError(f"cannot {step}: {'; '.join(blockers)}")
        message = self.roots.step(step, override)
        log.info("root rotation: %s", message)
        self._wake.set()
        if step is RootStep.PREPARE:
            message += " (HA: the leader takes the next steps itself once every replica's evidence allows them)"
        return message


def _pem(bundle: TrustBundle) -> str:
    return bundle.pem().decode()
