"""The scheduler's decision library: options, cost and quality models, the frame problem, the
policy, the allocator, the planner, baselines. numpy (+ cvxpy for deadlines); never torch or grpc."""
