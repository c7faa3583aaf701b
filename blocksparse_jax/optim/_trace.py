"""The jaxpr pass behind ``value_and_sparse_grad``: find the sparse uses, then evaluate with probes.

:func:`plan` walks the jaxpr of the differentiated function.  A leaf (a
differentiated array) is *sparse* when every use of it is a weight marker of
an op (:mod:`blocksparse_jax._sparse_sites`), directly or forwarded into
``jit``, ``checkpoint``, ``scan`` (as a constant), ``cond`` or ``switch``; each
matching use marker is a *site*.  Any other use (the leaf also read by a
``dot``, cast, returned, used inside a ``while_loop`` or a custom-derivative
function, a weight batched by ``vmap``) makes the leaf dense, with the reason.

:func:`evaluate` runs the jaxpr again with every site's output plus a zero
*probe*, and returns each site's rule inputs: differentiating with respect to
the probes gives each site's output cotangent, from which its rule gives the
pairs of the leaf's gradient.  Sites inside ``scan`` get one probe per
iteration (stacked), sites inside ``cond`` report whether their branch ran.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal, Var
from jax.extend.core import primitives as prims

from blocksparse_jax._sparse_sites import BlockLayout, SparseRule, use_p, weight_p

_CALLS = (prims.jit_p, prims.closed_call_p)


class Site(NamedTuple):
    """A use marker of a sparse leaf: where its probe goes and what its rule needs."""

    leaf: int
    rule: SparseRule
    out_aval: Any  # the marked output, as seen at the marker
    input_avals: tuple  # the rule's inputs, likewise
    lead: tuple[int, ...]  # the lengths of the scans around it, outermost first
    instance_dims: int  # leading axes added by vmap

    def probe_shape(self) -> tuple[int, ...]:
        return (*self.lead, *self.out_aval.shape)


class _Nested(NamedTuple):
    """An equation holding sites: the plans of its sub-jaxprs and every site id inside."""

    subs: tuple  # one plan (dict: equation index -> node) per sub-jaxpr
    site_ids: tuple[int, ...]
    depth: int  # the number of scans around the equation


class Plan(NamedTuple):
    """What :func:`plan` found.

    Attributes:
      sparse: the leaves that get a sparse gradient.
      layouts: the block layout of each sparse leaf.
      sites: every site of a sparse leaf, by id.
      tree: equation index -> ``int`` (a site id) or :class:`_Nested`, for the
        equations of the top-level jaxpr that hold sites.
      dense_reasons: for each leaf with a sparse use that stays dense, why.
      readers: for each sparse leaf, the dense leaves its sites' outputs depend
        on (their gradients are computed through the weight: the in-place
        update of the weight must wait for them).
    """

    sparse: tuple[int, ...]
    layouts: dict[int, BlockLayout]
    sites: tuple[Site, ...]
    tree: dict
    dense_reasons: dict[int, str]
    readers: dict[int, frozenset[int]]


# --------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------


class _Leaf(NamedTuple):  # the variable is leaf k itself
    k: int


class _Marked(NamedTuple):  # the variable is the output of weight marker ``uid`` on leaf k
    k: int
    uid: int


class _Walk:
    """One walk over a jaxpr and its sub-jaxprs, collecting candidate sites and dense uses."""

    def __init__(self, n_leaves: int):
        self.n_leaves = n_leaves
        self.candidates: list[Site] = []
        self.reasons: dict[int, str] = {}
        self.site_deps: dict[int, set[int]] = {}
        self.markers: dict[int, set[int]] = {}  # leaf -> its weight markers
        self.consumed: set[int] = set()  # the weight markers a site reads
        self.marked_leaves: set[int] = set()  # the leaves a weight marker reads, anywhere

    def dense(self, k: int, reason: str) -> None:
        self.reasons.setdefault(k, reason)

    def walk(self, jaxpr: Jaxpr, tags: dict, deps: dict, lead, context: str | None):
        """Walks ``jaxpr``; returns ``(tree, out_tags, out_deps)``.

        ``tags`` / ``deps`` map this jaxpr's input variables to a tag and to the
        set of leaves they depend on; ``context`` names an enclosing construct
        that a probe cannot pass (a while loop, a custom-derivative function).
        """
        tag_of = dict(tags)
        dep_of = dict(deps)
        tree: dict[int, Any] = {}

        def read_tag(v):
            return None if isinstance(v, Literal) else tag_of.get(v)

        def read_deps(v):
            return frozenset() if isinstance(v, Literal) else dep_of.get(v, frozenset())

        for i, eqn in enumerate(jaxpr.eqns):
            in_tags = [read_tag(v) for v in eqn.invars]
            in_deps = [read_deps(v) for v in eqn.invars]
            all_deps = frozenset().union(*in_deps)
            out_tags = [None] * len(eqn.outvars)
            out_deps = [all_deps] * len(eqn.outvars)
            prim = eqn.primitive
            if prim is weight_p:
                tag = in_tags[0]
                # A weight computed from leaves (a cast, a sum): they reach the op densely.
                for k, loose in in_deps[0]:
                    if loose and not isinstance(tag, _Leaf):
                        self.marked_leaves.add(k)
                        self.dense(
                            k,
                            "it reaches a sparse op through other operations (a cast, "
                            "an arithmetic op): the op must read the array itself",
                        )
                out_deps = [frozenset((k, False) for k, _ in in_deps[0])]
                if isinstance(tag, _Leaf):
                    self.marked_leaves.add(tag.k)
                    if eqn.params["batched"]:
                        self.dense(tag.k, "its sparse op is batched over the weight by vmap")
                    else:
                        uid = sum(map(len, self.markers.values()))
                        self.markers.setdefault(tag.k, set()).add(uid)
                        out_tags[0] = _Marked(tag.k, uid)
            elif prim is use_p:
                tag = in_tags[1]
                self._use(eqn, tag, in_tags, in_deps, lead, context, tree, i)
                out_deps = [in_deps[0]]
            elif prim in _CALLS or prim is prims.remat_p:
                sub = _sub(eqn)
                r = self.walk(
                    sub, _map_in(sub.invars, in_tags), _map_in(sub.invars, in_deps), lead, context
                )
                if r[0]:
                    tree[i] = _Nested((r[0],), (), len(lead))
                out_tags, out_deps = r[1], r[2]
            elif prim is prims.scan_p:
                self._scan(eqn, in_tags, in_deps, lead, context, tree, i)
            elif prim is prims.cond_p:
                self._cond(eqn, in_tags, in_deps, lead, context, tree, i)
            else:
                self._other(eqn, in_tags, lead, context)
            for v, t, d in zip(eqn.outvars, out_tags, out_deps, strict=True):
                if isinstance(v, Var):
                    if t is not None:
                        tag_of[v] = t
                    dep_of[v] = d
        return tree, [read_tag(v) for v in jaxpr.outvars], [read_deps(v) for v in jaxpr.outvars]

    def _use(self, eqn, tag, in_tags, in_deps, lead, context, tree, i):
        for t in in_tags[:1] + in_tags[2:]:
            if isinstance(t, _Leaf):
                self.dense(t.k, "it is also an input of the sparse rule")
        if not isinstance(tag, _Marked):
            return
        if context is not None:
            self.dense(tag.k, f"its sparse op runs {context}")
            return
        site = Site(
            tag.k,
            eqn.params["rule"],
            eqn.invars[0].aval,
            tuple(v.aval for v in eqn.invars[2:]),
            tuple(lead),
            eqn.params["instance_dims"],
        )
        self.candidates.append(site)
        self.consumed.add(tag.uid)
        self.site_deps.setdefault(tag.k, set()).update(k for k, _ in in_deps[0])
        tree[i] = site

    def _scan(self, eqn, in_tags, in_deps, lead, context, tree, i):
        p = eqn.params
        n_consts, n_carry = p["num_consts"], p["num_carry"]
        body = p["jaxpr"].jaxpr
        for pos, t in enumerate(in_tags):
            if isinstance(t, _Leaf) and pos >= n_consts:
                self.dense(t.k, "it is carried or sliced by a scan")
        tags = [t if pos < n_consts else None for pos, t in enumerate(in_tags)]
        # A carry may come to depend on anything the body reads.
        carried = frozenset().union(*in_deps)
        deps = [
            carried if n_consts <= pos < n_consts + n_carry else d for pos, d in enumerate(in_deps)
        ]
        r = self.walk(
            body,
            _map_in(body.invars, tags),
            _map_in(body.invars, deps),
            (*lead, p["length"]),
            context,
        )
        self._leaf_outputs(r[1], "it is returned from a scan")
        if r[0]:
            tree[i] = _Nested((r[0],), (), len(lead))

    def _cond(self, eqn, in_tags, in_deps, lead, context, tree, i):
        subs = []
        for branch in eqn.params["branches"]:
            j = branch.jaxpr
            r = self.walk(
                j, _map_in(j.invars, in_tags[1:]), _map_in(j.invars, in_deps[1:]), lead, context
            )
            self._leaf_outputs(r[1], "it is returned from a cond")
            subs.append(r[0])
        if any(subs):
            tree[i] = _Nested(tuple(subs), (), len(lead))

    def _other(self, eqn, in_tags, lead, context):
        """Any other equation: a leaf used here is dense; a marked weight is followed inside."""
        prim = eqn.primitive
        where = {
            prims.while_p: "inside a while_loop (a fori_loop with traced bounds)",
            prims.custom_jvp_call_p: "inside a custom_jvp function",
            prims.custom_vjp_call_p: "inside a custom_vjp function",
        }.get(prim, f"inside {prim.name}")
        for t in in_tags:
            if isinstance(t, _Leaf):
                opaque = prim in (prims.while_p, prims.custom_jvp_call_p, prims.custom_vjp_call_p)
                self.dense(
                    t.k, f"it is used {where}" if opaque else f"it is also used by {prim.name}"
                )
        if not any(t is not None for t in in_tags):
            return
        # A weight passed on into another construct (a marked weight into the op's
        # own custom VJP, say): a use marker inside it is out of reach of a probe.
        for sub, tags in _sub_inputs(eqn, in_tags):
            if tags is None:
                for t in in_tags:
                    if t is not None:
                        self.dense(t.k, f"its sparse op runs {where}")
                continue
            self.walk(sub, _map_in(sub.invars, tags), {}, lead, context or where)

    def _leaf_outputs(self, out_tags, reason):
        for t in out_tags:
            if isinstance(t, _Leaf):
                self.dense(t.k, reason)


def _map_in(invars, values) -> dict:
    return {v: x for v, x in zip(invars, values, strict=True) if x is not None}


def _sub(eqn) -> Jaxpr:
    params = eqn.params
    sub = params["jaxpr"] if "jaxpr" in params else params["call_jaxpr"]
    return sub.jaxpr if isinstance(sub, ClosedJaxpr) else sub


def _sub_inputs(eqn, in_tags):
    """``(sub-jaxpr, the tags of its inputs)`` for each sub-jaxpr of ``eqn``; tags ``None`` if unknown.

    A while loop's condition and body take its constants and carry; any other
    construct's sub-jaxpr is taken to read the equation's inputs in order when
    it has as many (``custom_jvp``, ``custom_vjp``, ``shard_map``).
    """
    if eqn.primitive is prims.while_p:
        p = eqn.params
        nc, nb = p["cond_nconsts"], p["body_nconsts"]
        carry = in_tags[nc + nb :]
        return [
            (p["cond_jaxpr"].jaxpr, in_tags[:nc] + carry),
            (p["body_jaxpr"].jaxpr, in_tags[nc:]),
        ]
    out = []
    for value in eqn.params.values():
        for item in value if isinstance(value, tuple) else (value,):
            sub = item.jaxpr if isinstance(item, ClosedJaxpr) else item
            if isinstance(sub, Jaxpr):
                out.append((sub, in_tags if len(sub.invars) == len(in_tags) else None))
    return out


def plan(closed: ClosedJaxpr, n_leaves: int, n_value_outputs: int = 1) -> Plan:
    """Finds the sparse leaves of ``closed`` (its first ``n_leaves`` inputs) and their sites.

    The first ``n_value_outputs`` outputs are differentiated; a leaf returned
    among them is dense.  The others (auxiliary outputs) do not count as uses.
    """
    jaxpr = closed.jaxpr
    walker = _Walk(n_leaves)
    tags = {v: _Leaf(k) for k, v in enumerate(jaxpr.invars[:n_leaves])}
    # A leaf's dependents: (leaf, loose), loose when not through a weight marker.
    deps = {v: frozenset([(k, True)]) for k, v in enumerate(jaxpr.invars[:n_leaves])}
    tree, out_tags, _ = walker.walk(jaxpr, tags, deps, (), None)
    walker._leaf_outputs(out_tags[:n_value_outputs], "it is returned as the value")

    by_leaf: dict[int, list[Site]] = {}
    for site in walker.candidates:
        by_leaf.setdefault(site.leaf, []).append(site)
    sparse, layouts, reasons = [], {}, {}
    for k in sorted(walker.marked_leaves):
        if walker.markers.get(k, set()) - walker.consumed:
            walker.dense(k, "the output of one of its sparse ops could not be followed")
        if k in walker.reasons or k not in by_leaf:
            reasons[k] = walker.reasons.get(k, "none of its sparse ops can be followed")
            continue
        shape = tuple(jaxpr.invars[k].aval.shape)
        found = {s.rule.layout(shape) for s in by_leaf[k]}
        if len(found) > 1:
            reasons[k] = "its sparse ops split it into blocks differently"
            continue
        sparse.append(k)
        layouts[k] = found.pop()

    # Number the sites of sparse leaves, and keep only the equations that hold them.
    sites: list[Site] = []
    ids: dict[int, int] = {}

    def prune(node):
        if isinstance(node, Site):
            if node.leaf not in layouts:
                return None
            key = id(node)
            if key not in ids:
                ids[key] = len(sites)
                sites.append(node)
            return ids[key]
        if isinstance(node, dict):
            out = {}
            for i, child in node.items():
                kept = prune(child)
                if kept is not None:
                    out[i] = kept
            return out or None
        subs = tuple(prune(s) or {} for s in node.subs)
        if not any(subs):
            return None
        inner: list[int] = []
        for s in subs:
            inner.extend(_site_ids(s))
        return _Nested(subs, tuple(inner), node.depth)

    pruned = prune(tree) or {}
    readers = {k: frozenset(walker.site_deps.get(k, set())) - frozenset(layouts) for k in layouts}
    return Plan(tuple(sparse), layouts, tuple(sites), pruned, reasons, readers)


def _site_ids(tree: dict) -> list[int]:
    out = []
    for node in tree.values():
        if isinstance(node, int):
            out.append(node)
        else:
            out.extend(node.site_ids)
    return out


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


class Extracted(NamedTuple):
    """What a site reports: its rule's inputs and whether it ran (``cond``), stacked by scans."""

    inputs: tuple
    active: jax.Array


def zero_probes(p: Plan) -> list[jax.Array]:
    return [jnp.zeros(s.probe_shape(), s.out_aval.dtype) for s in p.sites]


def evaluate(closed: ClosedJaxpr, args: Sequence, p: Plan, probes: Sequence[jax.Array]):
    """``(outputs, {site id: Extracted})`` of ``closed`` with the probes added at the sites."""
    return _eval(closed.jaxpr, closed.consts, list(args), p.tree, p.sites, dict(enumerate(probes)))


def _eval(jaxpr: Jaxpr, consts, args, tree: dict, sites, probes: dict):
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    extracted: dict[int, Extracted] = {}
    for i, eqn in enumerate(jaxpr.eqns):
        invals = [read(v) for v in eqn.invars]
        node = tree.get(i)
        if node is None:
            with eqn.ctx.manager:
                ans = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            outvals = ans if eqn.primitive.multiple_results else [ans]
        elif isinstance(node, int):
            outvals = [invals[0] + probes[node]]
            extracted[node] = Extracted(tuple(invals[2:]), jnp.ones((), jnp.bool_))
        else:
            outvals, ex = _eval_nested(eqn, invals, node, sites, probes)
            extracted.update(ex)
        for v, x in zip(eqn.outvars, outvals, strict=True):
            if isinstance(v, Var):
                env[v] = x
    return [read(v) for v in jaxpr.outvars], extracted


def _eval_nested(eqn, invals, node: _Nested, sites, probes):
    prim = eqn.primitive
    mine = {s: probes[s] for s in node.site_ids}
    if prim in _CALLS:
        sub = eqn.params["jaxpr"] if prim is prims.jit_p else eqn.params["call_jaxpr"]
        return _eval(sub.jaxpr, sub.consts, invals, node.subs[0], sites, mine)
    if prim is prims.remat_p:
        sub = eqn.params["jaxpr"]

        def body(invals, mine):
            return _eval(sub, (), invals, node.subs[0], sites, mine)

        fn = jax.checkpoint(
            body, prevent_cse=eqn.params["prevent_cse"], policy=eqn.params["policy"]
        )
        return fn(invals, mine)
    if prim is prims.scan_p:
        return _eval_scan(eqn, invals, node, sites, mine)
    if prim is prims.cond_p:
        return _eval_cond(eqn, invals, node, sites, mine)
    raise AssertionError(f"no sites are planned inside {prim.name}")


def _eval_scan(eqn, invals, node: _Nested, sites, mine):
    p = eqn.params
    n_consts, n_carry = p["num_consts"], p["num_carry"]
    body = p["jaxpr"]
    consts, init, xs = (
        invals[:n_consts],
        invals[n_consts : n_consts + n_carry],
        invals[n_consts + n_carry :],
    )

    def step(carry, x):
        xs_t, probes_t = x
        outs, ex = _eval(
            body.jaxpr, body.consts, [*consts, *carry, *xs_t], node.subs[0], sites, probes_t
        )
        return outs[:n_carry], (outs[n_carry:], ex)

    carry, (ys, ex) = lax.scan(
        step, init, (xs, mine), length=p["length"], reverse=p["reverse"], unroll=p["unroll"]
    )
    return [*carry, *ys], ex


def _eval_cond(eqn, invals, node: _Nested, sites, mine):
    index, ops = invals[0], invals[1:]

    def absent(s: int) -> Extracted:
        site = sites[s]
        lead = site.lead[node.depth :]  # the scans between this cond and the site
        return Extracted(
            tuple(jnp.zeros((*lead, *a.shape), a.dtype) for a in site.input_avals),
            jnp.zeros(lead, jnp.bool_),
        )

    def branch_fn(b):
        branch = eqn.params["branches"][b]
        sub_tree = node.subs[b]

        def fn(ops, mine):
            outs, ex = _eval(branch.jaxpr, branch.consts, ops, sub_tree, sites, mine)
            return outs, {s: ex[s] if s in ex else absent(s) for s in node.site_ids}

        return fn

    outs, ex = lax.switch(index, [branch_fn(b) for b in range(len(node.subs))], ops, mine)
    return outs, ex


# --------------------------------------------------------------------------------------
# From probes' cotangents to pairs
# --------------------------------------------------------------------------------------


def site_pairs(site: Site, cotangent: jax.Array, ex: Extracted, n_blocks: int):
    """The :class:`~blocksparse_jax._sparse_sites.BlockPairs` of every instance of a site.

    An instance is one call of the op: one per scan iteration, times the
    leading axes that ``vmap`` added.  A site whose ``cond`` branch did not run
    gives padding pairs.
    """
    lead = len(site.lead) + site.instance_dims
    lead_shape = cotangent.shape[:lead]
    n = math.prod(lead_shape)
    active = jnp.broadcast_to(
        ex.active.reshape(ex.active.shape + (1,) * site.instance_dims), lead_shape
    ).reshape(n)
    if lead == 0:
        pairs = site.rule.pairs(cotangent, *ex.inputs)
        return pairs._replace(blocks=jnp.where(active[0], pairs.blocks, n_blocks))
    flat = lambda a: a.reshape(n, *a.shape[lead:])
    pairs = jax.vmap(site.rule.pairs)(flat(cotangent), *map(flat, ex.inputs))
    per = pairs.blocks.shape[1:]
    blocks = jnp.where(active.reshape(n, *(1,) * len(per)), pairs.blocks, n_blocks)
    left = None if pairs.left is None else pairs.left.reshape(-1, pairs.left.shape[-1])
    return pairs._replace(
        blocks=blocks.reshape(-1), left=left, right=pairs.right.reshape(-1, pairs.right.shape[-1])
    )
