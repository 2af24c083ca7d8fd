"""The scheduler's decision library: options, cost and quality models, the frame problem, the
policy, the allocator, the planner, baselines, the calibrators, the edge a plan is routed to.
What the service's live state (../live) calls; no threads, no network. numpy (+ cvxpy for
deadlines); never torch or grpc."""
