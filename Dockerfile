# A minidist image: dcenter, dworker and dssh on PATH.
#   docker build -t minidist .
#   docker run --rm --network host -e MINIDIST_AUTH_KEY minidist dcenter
#   docker run --rm --network host -e MINIDIST_AUTH_KEY minidist dworker HOST:8787
FROM python:3.11-slim
WORKDIR /opt/minidist
COPY setup.py README.md ./
COPY minidist ./minidist
RUN pip install --no-cache-dir . && useradd --create-home minidist
USER minidist
EXPOSE 8787
CMD ["dcenter"]
