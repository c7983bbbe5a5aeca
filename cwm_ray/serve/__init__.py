"""Ray Serve: world-model and verifier replicas behind an OpenAI-compatible FastAPI ingress.

`cwm_ray.serve.app:build_app` is the application builder named by configs/serve.yaml.
"""
