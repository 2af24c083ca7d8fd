"""Tandem's scheduler: pure decision logic (no gRPC, no models) and the service around it.

Per time frame, choose for each user an option (total steps T, split k, merge ratio r, codec) and
share the edge GPU and the downlink band, maximizing Σ quality − λ_lat·latency − λ_en·energy under
per-user latency and energy budgets.

Modules, one job each:
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

The service (only servicer, server and client import grpc):
  frames      frame collector (requests within a window decided together)
  edges       edge registry: heartbeats, expiry, a leaving edge dropped at once
  routing     the edge a plan goes to: the earliest predicted finish (measured speed × load)
  core        plan requests → frames → plans; reports → calibration
  ratelimit   a token bucket per caller on Plan
  state       --state-file: what the core learned, saved atomically and restored at start
  metrics     Prometheus metrics
  servicer    the SchedulerService gRPC servicer
  server      `python -m services.scheduler`
  client      request_plan / report for devices and the CLI
"""
