"""Delta rule (DeltaNet): the gated delta rule with no decay, ``g = 0``.

Recurrence, per value head with state ``S [Dk, Dv]``::

    u_t = beta_t (v_t - S^T k_t);   S <- S + k_t u_t^T;   o_t = S^T (scale q_t)

The forms (chunk, parallel, recurrent, naive reference) are those of :mod:`hybridattn.ops.gated_delta_rule`,
run with ``g=None``; this module only gives the mechanism its own name and signature (fla's ``chunk_delta_rule``).

Shape legend: B batch, T tokens, Hk query/key heads, Hv value heads, Dk key dim, Dv value dim, N sequences.
"""

from __future__ import annotations

from hybridattn.ops.gated_delta_rule import gated_delta_rule, naive_recurrent_gated_delta_rule


def delta_rule(
    q,
    k,
    v,
    beta,
    *,
    scale=None,
    initial_state=None,
    output_final_state=False,
    use_qk_l2norm=False,
    mode="chunk",
    chunk_size=64,
    cu_seqlens=None,
    return_attention=False,
):
    """DeltaNet: ``u_t = beta_t (v_t - S^T k_t); S <- S + k_t u_t^T; o_t = S^T (scale q_t)``.

    Args:
        q, k: ``[B, T, Hk, Dk]``. v: ``[B, T, Hv, Dv]`` (``Hv % Hk == 0``). beta: ``[B, T, Hv]``.
        scale, initial_state, output_final_state, use_qk_l2norm, mode, chunk_size, cu_seqlens,
            return_attention: as :func:`~hybridattn.ops.gated_delta_rule.gated_delta_rule`.

    Returns:
        ``(o [B, T, Hv, Dv], final_state [B|N, Hv, Dk, Dv] or None)`` (and the attention matrix on request).

    Raises:
        TypeError, ValueError: as :func:`~hybridattn.ops.gated_delta_rule.gated_delta_rule`.
    """
    return gated_delta_rule(
        q, k, v, None, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        use_qk_l2norm=use_qk_l2norm, mode=mode, chunk_size=chunk_size, cu_seqlens=cu_seqlens,
        return_attention=return_attention,
    )


def naive_recurrent_delta_rule(
    q, k, v, beta, *, scale=None, initial_state=None, output_final_state=False, use_qk_l2norm=False
):
    """The token-loop reference for :func:`delta_rule` (``naive_recurrent_gated_delta_rule`` with ``g=None``)."""
    return naive_recurrent_gated_delta_rule(
        q, k, v, None, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        use_qk_l2norm=use_qk_l2norm,
    )
