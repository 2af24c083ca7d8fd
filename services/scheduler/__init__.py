"""Tandem's scheduler: pure decision logic (no gRPC, no models) and the service around it.

Per time frame, choose for each user an option (total steps T, split k, merge ratio r, codec) and
share the edge GPU and the downlink band, maximizing Σ quality − λ_lat·latency − λ_en·energy under
per-user latency and energy budgets.

Packages and modules, one job each (decide/: the decision library; learn/: what makes its
inputs, torch allowed; live/: the service's in-memory state; the rest: the service around it):
  options     the discrete option table (the policy's action space)
  quality     quality profiles (JSON format, interpolation, synthetic default)
  channel     Shannon-rate downlink for simulation
  costs       edge/device/transfer/energy cost models, CostProfile JSON, online calibration
  scenario    UserSpec, FrameContext, ObjectiveConfig, seeded scenario generator
  problem     a frame as arrays + the vectorized frame objective (closed-form shares)
  allocator   GPU/band shares: closed form and cvxpy with deadlines
  baselines   all-edge, all-device, best fixed split, greedy (+1-opt local search), random
  exact       exact optimum for small frames (dominance + branch and bound + enumeration)
  features    sequential per-user state and observation (shared by env and policy)
  env         gymnasium environment (one episode = one frame, one step = one user)
  lagrangian  PID Lagrangian multiplier
  policy      the trained actor: safetensors + JSON, numpy inference
  train       `python -m services.scheduler.learn.train` (MaskablePPO + PID-Lagrangian)
  planner     plan_frame(users, quality, costs, decider) -> list[Plan]
  routing     the edge a plan goes to: the earliest predicted finish (measured speed × load)

The live state (live/; threads and asyncio, no grpc, no torch):
  frames      frame collector (requests within a window decided together)
  edges       edge registry: heartbeats, expiry, a leaving edge dropped at once
  occupancy   the spans reports measured on each edge: the batch an edge report ran in
  pending     plans awaiting a report, bounded per user and in all
  guard       the policy checked against greedy + local search in the background
  core        plan requests → frames → plans; reports → calibration

The service (only servicer and server import grpc):
  edge_auth   which callers may heartbeat as an edge
  ratelimit   a token bucket per caller on Plan
  state       --state-file: what the core learned, saved atomically and restored at start
  defaults    the profiles and policy the service starts with
  metrics     Prometheus metrics
  servicer    the SchedulerService gRPC servicer
  server      `python -m services.scheduler`
The scheduler's client (request_plan / report for devices and the CLI) is
services/common/scheduler_client.py.
"""
