"""Glossary of the axis letters used in shape comments (``# (B, N, D)``).

====  =======================================================================
B     batch (samples, or episodes running in lockstep)
T     time: environment steps or segments of an episode
N     tokens in a sequence (prefix, suffix or the two together)
L     length of the key/value side of attention (cached + new tokens)
P     visual patches of one image (before or after pixel shuffle)
C     image channels, or cameras where noted
H     image height in pixels (``Hh`` = attention heads, see below)
W     image width in pixels
Hh    attention (query) heads
Hkv   key/value heads (grouped-query attention: Hh is a multiple of Hkv)
Dh    width of one attention head
D     model width (hidden size); ``De`` for the action expert's width
F     MLP intermediate width
M     memory slots (recurrent memory tokens)
A     action horizon (chunk length)
Da    action dimension; ``Ds`` state dimension
V     vocabulary size
S     segments of an episode
K     slots of a temporal context (past frames it holds) or extra keys, where noted
Di    inner width of a Mamba (selective state-space) mixer (``d_inner``)
Dn    state size per inner channel of a selective SSM (``d_state``)
Kc    width of a Mamba mixer's causal depthwise convolution (``d_conv``)
R     rank of a Mamba mixer's time-step projection (``dt_rank``); a vision tower's prefix
      tokens (class, registers) where noted
Lc    chunk length of the chunked selective scan; ``Nc`` the number of chunks
E     width of an experience store's embeddings (:mod:`memvla.retrieval`)
k     items retrieved per query (``A_s`` the actions of one item the model reads); ``K``
      is also the draws per observation where a confidence samples several chunks
====  =======================================================================
"""
