"""skewless: one Beam codebase for training features, the online feature store and scoring."""

from setuptools import find_packages, setup

setup(
    name="skewless",
    version="0.1.0",
    description="Training/serving-skew-free ML features on Apache Beam and tf.Transform",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["skewless", "skewless.*"]),
    # The pinned stack lives in requirements.txt (exact pins); Dataflow workers get the same
    # image, so only the project itself is installed from here.
    install_requires=[],
    entry_points={"console_scripts": ["skewless=skewless.beam_pipelines.runtime.cli:main"]},
)
