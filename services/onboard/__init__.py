"""Onboarding a pack pair: measure what the scheduler needs to plan for it on this hardware (a cost
profile) and how good its images are at every option (a quality profile), in one command."""
