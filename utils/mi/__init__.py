"""The method's mutual-information side (PAPER.md §1, §3–§5, §10).

- ``bounds``: the per-sample MI lower bounds (JSD, DV, InfoNCE; PAPER.md §3).
- ``estimators``: building E_n and E_a, feeding them the target's outputs, and their files.
- ``objectives``: stage 2's estimator losses (§5) and the Fig. 4 table.
- ``patterns``: the natural/adversarial pattern split and sample selection (§1, §4; paper Eq. 6).
- ``release_compat``: the release's numerics, behind ``--release-compat`` (§10).

May import ``utils.attacks.base``, ``utils.script`` and the lower layer of ``utils.training``
(``checkpoint``, ``distributed``); never the epoch loop, the evaluation or the scripts."""
