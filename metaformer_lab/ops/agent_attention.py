"""Agent attention (Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention", ECCV 2024).

A few agent tokens, the queries average-pooled to an a x a grid, first gather from the keys and values (agent
aggregation: softmax over the keys), then every query reads the agents (agent broadcast: softmax over the agents):
two softmax attentions of cost O(N * A) instead of one of O(N^2). Each gets a learned position bias (a low-rank
h + w part plus a 7 x 7 map interpolated to the grid), and a depthwise conv of the values is added to the output
to give back the diversity the few agents lose. It works on the whole map (Agent-PVT, Agent-Swin's stages at
Swin's clamped window), inside Swin's windows, or with keys and values from PVT's reduced grid.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from metaformer_lab.core.errors import ShapeIssue
from metaformer_lab.core.lazy_torch import F, Tensor, nn, torch
from metaformer_lab.core.registry import Case, Folding, OpDef, Resolved, Settings
from metaformer_lab.core.types import TensorType
from metaformer_lab.ops.attention import NUM_HEADS_DOC, attend, grid_attention_heads, head_dim_field
from metaformer_lab.ops.common import OddKernel, PosInt, Prob, require_divides
from metaformer_lab.ops.norms import LayerNormSpec, NormSpec, build_norm, check_norm
from metaformer_lab.ops.prefix import GridOpSpec, around_prefix
from metaformer_lab.ops.window_attention import merge, partition

BIAS_STD = 0.02
"""Standard deviation of the agent biases' truncated-normal init (the authors' ``trunc_normal_(std=.02)``)."""


class AgentAttentionSpec(GridOpSpec):
    """Agent attention: agent tokens pooled from the queries attend to the keys and values, then the queries attend
    to the agents, with agent biases and a depthwise conv of the values added (Agent-Swin's and Agent-PVT's
    ``AgentAttention``).

    ``window: null`` attends over the whole map (Agent-PVT; Agent-Swin-T's agent stages, whose window of 56 Swin
    clamps to the map); a window size runs it inside non-overlapping windows (not shifted), agents per window.
    ``sr_ratio`` takes keys and values from PVT's reduced grid (strided conv + ``norm``); the values are then
    upsampled (bilinear) to the query grid for the depthwise conv.
    """

    type: Literal["agent_attention"] = "agent_attention"
    agents: PosInt = Field(49, description="agent tokens, a square number: the queries average-pooled to a sqrt x sqrt "
                                           "grid (per window)")
    window: PosInt | None = Field(None, description="side of the non-overlapping windows; must divide H and W; null: "
                                                    "the whole map")
    sr_ratio: PosInt = Field(1, description="keys and values from a sr_ratio x sr_ratio strided conv + norm of the "
                                            "map (PVT); must divide H and W; 1: from every token")
    norm: NormSpec | None = Field(default_factory=lambda: LayerNormSpec(eps=1e-5, affine=True, bias=True),
                                  description="after the reduction conv (sr_ratio > 1)")
    num_heads: PosInt | None = Field(None, description=NUM_HEADS_DOC)
    head_dim: PosInt | None = head_dim_field(32)
    agent_bias: bool = Field(True, description="the learned position biases of both attentions (agent-key and "
                                               "query-agent: an h + w part and a bias_size map interpolated to the "
                                               "grid); false: none")
    bias_size: PosInt = Field(7, description="side of the learned bias maps that are interpolated (bilinear) to the "
                                             "key and query grids")
    dwc: OddKernel | None = Field(3, description="kernel of the depthwise conv of the value map added to the output; "
                                                 "null: none")
    qkv_bias: bool = True
    attn_drop: Prob = 0.0
    proj_drop: Prob = 0.0
    fused: bool = Field(True, description="F.scaled_dot_product_attention; false: explicit softmax(q kᵀ)")


class AgentAttention(nn.Module):
    """Parameter names follow the authors' ``AgentAttention``: qkv (Agent-Swin; without reduction), q and kv with
    sr and norm (Agent-PVT's reduction), dwc, proj and the biases an_bias, na_bias (heads, agents, s, s), ah_bias,
    aw_bias (agent-key, h and w parts) and ha_bias, wa_bias (query-agent). Input and output (B, H, W, C)."""

    qkv: nn.Linear | None
    q: nn.Linear | None
    kv: nn.Linear | None
    sr: nn.Conv2d | None

    def __init__(self, dim: int, grid: tuple[int, int], window: int | None, agents: int, sr_ratio: int,
                 norm: nn.Module, num_heads: int, head_dim: int, agent_bias: bool, bias_size: int, dwc: int | None,
                 qkv_bias: bool, attn_drop: float, proj_drop: float, fused: bool, out_dim: int | None = None) -> None:
        super().__init__()
        self.grid, self.window, self.fused = grid, window, fused
        self.num_heads, self.head_dim, self.agents = num_heads, head_dim, agents
        self.queries = (window, window) if window is not None else grid  # the grid one attention sees
        self.keys = (self.queries[0] // sr_ratio, self.queries[1] // sr_ratio)
        inner = num_heads * head_dim
        self.reduces = sr_ratio > 1
        self.qkv = None if self.reduces else nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.q = nn.Linear(dim, inner, bias=qkv_bias) if self.reduces else None
        self.kv = nn.Linear(dim, 2 * inner, bias=qkv_bias) if self.reduces else None
        self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio) if self.reduces else None
        self.norm = norm
        self.pool = nn.AdaptiveAvgPool2d(math.isqrt(agents))
        self.attn_drop = nn.Dropout(attn_drop)
        self.dwc = nn.Conv2d(inner, inner, dwc, padding=dwc // 2, groups=inner) if dwc is not None else None
        self.proj = nn.Linear(inner, out_dim or dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.an_bias = self.na_bias = self.ah_bias = self.aw_bias = self.ha_bias = self.wa_bias = None
        if agent_bias:
            (qh, qw), (kh, kw) = self.queries, self.keys
            self.an_bias = nn.Parameter(torch.zeros(num_heads, agents, bias_size, bias_size))
            self.na_bias = nn.Parameter(torch.zeros(num_heads, agents, bias_size, bias_size))
            self.ah_bias = nn.Parameter(torch.zeros(1, num_heads, agents, kh, 1))
            self.aw_bias = nn.Parameter(torch.zeros(1, num_heads, agents, 1, kw))
            self.ha_bias = nn.Parameter(torch.zeros(1, num_heads, qh, 1, agents))
            self.wa_bias = nn.Parameter(torch.zeros(1, num_heads, 1, qw, agents))
            self.init_weights()

    def init_weights(self) -> None:
        """The authors' truncated-normal init of the biases (std .02)."""
        for bias in (self.an_bias, self.na_bias, self.ah_bias, self.aw_bias, self.ha_bias, self.wa_bias):
            if bias is not None:
                nn.init.trunc_normal_(bias, std=BIAS_STD)

    def biases(self) -> tuple[Tensor | None, Tensor | None]:
        """(1, heads, A, M) agent-key and (1, heads, N, A) query-agent logit biases, or None without them."""
        if self.an_bias is None:  # all six or none
            return None, None
        heads, agents = self.num_heads, self.agents
        to_keys = F.interpolate(self.an_bias, size=self.keys, mode="bilinear").reshape(1, heads, agents, -1)
        to_keys = to_keys + (self.ah_bias + self.aw_bias).reshape(1, heads, agents, -1)
        to_agents = F.interpolate(self.na_bias, size=self.queries, mode="bilinear").reshape(1, heads, agents, -1)
        to_agents = to_agents.transpose(-2, -1) + (self.ha_bias + self.wa_bias).reshape(1, heads, -1, agents)
        # contiguous: a transposed bias makes the logits it is added to transposed, and the softmax over them slow
        return to_keys, to_agents.contiguous()

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(b, qh, qw, C) -> queries (b, N, inner), keys and values (b, M, inner) each."""
        if self.qkv is not None:
            return self.qkv(x.flatten(1, 2)).chunk(3, dim=-1)
        assert self.q is not None and self.kv is not None and self.sr is not None
        small = self.norm(self.sr(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))  # (b, kh, kw, C)
        k, v = self.kv(small.flatten(1, 2)).chunk(2, dim=-1)
        return self.q(x.flatten(1, 2)), k, v

    def forward(self, x: Tensor) -> Tensor:  # (B, H, W, C) -> (B, H, W, C')
        if self.window is not None:
            x = partition(x, self.window).unflatten(1, self.queries)  # (B*nW, w, w, C)
        b = x.shape[0]
        heads, d = self.num_heads, self.head_dim
        (qh, qw), (kh, kw) = self.queries, self.keys
        q, k, v = self.project(x)  # (b, N, inner), (b, M, inner) x 2
        agents = self.pool(q.transpose(1, 2).unflatten(2, self.queries)).flatten(2).transpose(1, 2)  # (b, A, inner)
        q, k, v, agents = (t.unflatten(-1, (heads, d)).transpose(1, 2) for t in (q, k, v, agents))  # (b, heads, ., d)
        to_keys, to_agents = self.biases()
        agent_v = attend(agents, k, v, bias=to_keys, drop=self.attn_drop, fused=self.fused)  # (b, heads, A, d)
        y = attend(q, agents, agent_v, bias=to_agents, drop=self.attn_drop, fused=self.fused)  # (b, heads, N, d)
        y = y.transpose(1, 2).flatten(2)  # (b, N, inner)
        if self.dwc is not None:
            values = v.transpose(1, 2).reshape(b, kh, kw, -1).permute(0, 3, 1, 2)  # (b, inner, kh, kw)
            if self.reduces:
                values = F.interpolate(values, size=self.queries, mode="bilinear")
            y = y + self.dwc(values).flatten(2).transpose(1, 2)
        y = self.proj_drop(self.proj(y))  # (b, N, C')
        if self.window is not None:
            return merge(y, self.grid, self.window)
        return y.reshape(b, qh, qw, -1)


def agent_attention_shape(spec: AgentAttentionSpec, x: TensorType,
                          out_dim: int | None) -> tuple[TensorType, Settings]:
    out, num_heads, head_dim = grid_attention_heads(spec, x, out_dim, op="agent_attention")
    if math.isqrt(spec.agents) ** 2 != spec.agents:
        raise ShapeIssue("agents", f"{spec.agents} is not a square number (the agents are an a x a pooled grid)")
    if spec.window is not None:
        require_divides("window", spec.window, x)
        if spec.sr_ratio != 1:
            raise ShapeIssue("sr_ratio", f"{spec.sr_ratio} reduces the whole map's keys; windows take sr_ratio 1")
    require_divides("sr_ratio", spec.sr_ratio, x)
    if spec.sr_ratio > 1:
        check_norm(spec.norm, x.with_grid(x.height // spec.sr_ratio, x.width // spec.sr_ratio), "norm")
    return out, {"num_heads": num_heads, "head_dim": head_dim}


def _build_agent_attention(spec: AgentAttentionSpec, r: Resolved) -> AgentAttention:
    x = r.in_type
    small = x.with_grid(x.height // spec.sr_ratio, x.width // spec.sr_ratio)
    norm = build_norm(spec.norm, small) if spec.sr_ratio > 1 and spec.norm is not None else nn.Identity()
    return AgentAttention(x.channels, grid=x.grid, window=spec.window, agents=spec.agents, sr_ratio=spec.sr_ratio,
                          norm=norm, num_heads=r["num_heads"], head_dim=r["head_dim"], agent_bias=spec.agent_bias,
                          bias_size=spec.bias_size, dwc=spec.dwc, qkv_bias=spec.qkv_bias, attn_drop=spec.attn_drop,
                          proj_drop=spec.proj_drop, fused=spec.fused, out_dim=r.out_type.channels)


def fold_agent_attention(module: nn.Module) -> Folding | None:
    """qkv reads the input (windowing moves tokens, not channels), or q and the reduction conv (kernel = stride,
    no padding); proj writes the output."""
    if not isinstance(module, AgentAttention):
        return None
    reads = (module.qkv,) if module.qkv is not None else (module.q, module.sr)
    return Folding(reads=tuple(m for m in reads if m is not None), writes=module.proj)


AGENT_ATTENTION = around_prefix(OpDef(
    AgentAttentionSpec,
    infer=agent_attention_shape,
    build=_build_agent_attention,
    preserves_type=True,
    fold=fold_agent_attention,
    cases=(
        Case({"agents": 4, "num_heads": 2}, TensorType("tokens", 16, 4, 6)),
        Case({"agents": 4, "window": 4, "head_dim": 8, "fused": False}, TensorType("tokens", 16, 8, 4),
             id="windows"),
        Case({"agents": 9, "sr_ratio": 2, "num_heads": 2}, TensorType("tokens", 16, 4, 6), id="pvt-reduced"),
        Case({"agents": 4, "sr_ratio": 2, "num_heads": 2, "norm": None, "fused": False},
             TensorType("tokens", 16, 4, 4), id="reduced-no-norm"),
        Case({"agents": 1, "num_heads": 1, "agent_bias": False, "dwc": None}, TensorType("tokens", 8, 3, 3),
             id="bare"),
        Case({"agents": 4, "num_heads": 2, "dwc": 5, "bias_size": 3}, TensorType("tokens", 16, 4, 4), id="dwc5"),
        Case({"agents": 4, "head_dim": 8, "prefix": "pass"}, TensorType("tokens", 16, 4, 4, prefix=1),
             id="prefix-pass"),
    ),
))
