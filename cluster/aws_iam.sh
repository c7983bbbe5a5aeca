#!/usr/bin/env bash
# One-time IAM set-up for cluster/aws.yaml: two instance profiles, so no AWS key is ever written into a
# config or an image. Run with admin credentials on your laptop:  cluster/aws_iam.sh my-bucket
#   cwm-ray-head    EC2 (launch and end workers), pass the worker role, read/write s3://BUCKET
#   cwm-ray-worker  read/write s3://BUCKET (videos, models, annotation output, checkpoints)
# Re-running it is harmless: existing roles and profiles are kept, policies are overwritten.
set -euo pipefail
BUCKET=${1:?usage: cluster/aws_iam.sh BUCKET}
ACCOUNT=$(aws sts get-caller-identity --query Account --output text)
TRUST='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}'
S3="{\"Effect\":\"Allow\",\"Action\":[\"s3:ListBucket\",\"s3:GetBucketLocation\"],\"Resource\":\"arn:aws:s3:::$BUCKET\"},
    {\"Effect\":\"Allow\",\"Action\":[\"s3:GetObject\",\"s3:PutObject\",\"s3:DeleteObject\",\"s3:AbortMultipartUpload\"],
     \"Resource\":\"arn:aws:s3:::$BUCKET/*\"}"

make_role() {  # name, inline policy statements
  aws iam get-role --role-name "$1" >/dev/null 2>&1 \
    || aws iam create-role --role-name "$1" --assume-role-policy-document "$TRUST" >/dev/null
  aws iam put-role-policy --role-name "$1" --policy-name "$1-access" \
    --policy-document "{\"Version\":\"2012-10-17\",\"Statement\":[$2]}"
  if ! aws iam get-instance-profile --instance-profile-name "$1" >/dev/null 2>&1; then
    aws iam create-instance-profile --instance-profile-name "$1" >/dev/null
    aws iam add-role-to-instance-profile --instance-profile-name "$1" --role-name "$1"
  fi
}

make_role cwm-ray-worker "$S3"
make_role cwm-ray-head "$S3,
  {\"Effect\":\"Allow\",\"Action\":\"iam:PassRole\",\"Resource\":\"arn:aws:iam::$ACCOUNT:role/cwm-ray-worker\"}"
aws iam attach-role-policy --role-name cwm-ray-head --policy-arn arn:aws:iam::aws:policy/AmazonEC2FullAccess
echo "instance profiles cwm-ray-head and cwm-ray-worker ready for s3://$BUCKET (IAM takes ~15 s to propagate)"
